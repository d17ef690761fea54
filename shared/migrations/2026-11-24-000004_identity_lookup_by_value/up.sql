-- Replaces the (tenant_id, lower(...)) indexes of 000003. The worker now looks each value
-- up across tenants and filters the tenant afterwards, so that stale statistics (a bulk load
-- outruns them) can never make PostgreSQL read a tenant's every user through the primary key
-- instead of probing one value.
DROP INDEX users_email_ci;
DROP INDEX users_user_name_ci;
CREATE INDEX users_email_ci ON users (lower(email)) WHERE email IS NOT NULL;
CREATE INDEX users_user_name_ci ON users (lower(user_name)) WHERE user_name IS NOT NULL;
