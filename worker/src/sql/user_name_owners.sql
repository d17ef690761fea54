-- The users of tenant $1 whose user_name, lowercased, is one of $2 (lowercased values).
-- One probe of the users_user_name_ci index per value: a LATERAL subquery that cannot be
-- flattened (OFFSET 0) runs once per value whatever the statistics say; plans chosen on
-- statistics went quadratic or scanned the table during bulk loads. The tenant is filtered
-- afterwards, on purpose (migration 000004).
SELECT v.value, u.unique_id
FROM unnest($2::text[]) AS v(value)
CROSS JOIN LATERAL (
  SELECT unique_id, tenant_id FROM users
  WHERE user_name IS NOT NULL AND lower(user_name) = v.value OFFSET 0) u
WHERE u.tenant_id = $1
