-- An email or user name may belong to one user of a tenant only (compared
-- case-insensitively); the worker checks rows against these before importing them.
CREATE INDEX users_email_ci ON users (tenant_id, lower(email)) WHERE email IS NOT NULL;
CREATE INDEX users_user_name_ci ON users (tenant_id, lower(user_name)) WHERE user_name IS NOT NULL;
