DROP INDEX users_user_name_ci;
DROP INDEX users_email_ci;
CREATE INDEX users_email_ci ON users (tenant_id, lower(email)) WHERE email IS NOT NULL;
CREATE INDEX users_user_name_ci ON users (tenant_id, lower(user_name)) WHERE user_name IS NOT NULL;
