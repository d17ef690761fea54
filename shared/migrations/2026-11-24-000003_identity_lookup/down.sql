DROP INDEX users_user_name_ci;
DROP INDEX users_email_ci;
