ALTER TABLE users DROP CONSTRAINT users_user_name_unique, DROP CONSTRAINT users_email_unique;
