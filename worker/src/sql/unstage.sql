DELETE FROM users_stage WHERE row_no = ANY($1)
