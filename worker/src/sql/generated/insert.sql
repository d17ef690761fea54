INSERT INTO users (tenant_id, unique_id, login_source, first_name, last_name, user_name, email, street, city, province, postal_code, street2, city2, state2, zip2, phone_cell, user_type_id, employ_no, employee_phone, student_no, student_phone, drivers_license_num, drivers_license_prov, date_of_birth, active,
  archived_at, archive_suffix, last_file_id, last_row, row_digest)
SELECT $1, s.unique_id, s.login_source,
  CASE WHEN 'first_name' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.first_name, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.first_name END,
  CASE WHEN 'last_name' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.last_name, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.last_name END,
  CASE WHEN 'user_name' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.user_name, ('_' || to_char(now(), 'YYYY')), 150) ELSE s.user_name END,
  CASE WHEN 'email' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.email, ('_' || to_char(now(), 'YYYY')), 254) ELSE s.email END,
  CASE WHEN 'street' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.street, ('_' || to_char(now(), 'YYYY')), 200) ELSE s.street END,
  CASE WHEN 'city' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.city, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.city END,
  CASE WHEN 'province' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.province, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.province END,
  CASE WHEN 'postal_code' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.postal_code, ('_' || to_char(now(), 'YYYY')), 20) ELSE s.postal_code END,
  CASE WHEN 'street2' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.street2, ('_' || to_char(now(), 'YYYY')), 200) ELSE s.street2 END,
  CASE WHEN 'city2' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.city2, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.city2 END,
  CASE WHEN 'state2' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.state2, ('_' || to_char(now(), 'YYYY')), 100) ELSE s.state2 END,
  CASE WHEN 'zip2' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.zip2, ('_' || to_char(now(), 'YYYY')), 20) ELSE s.zip2 END,
  CASE WHEN 'phone_cell' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.phone_cell, ('_' || to_char(now(), 'YYYY')), 40) ELSE s.phone_cell END,
  CASE WHEN 'user_type_id' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.user_type_id, ('_' || to_char(now(), 'YYYY')), 50) ELSE s.user_type_id END,
  CASE WHEN 'employ_no' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.employ_no, ('_' || to_char(now(), 'YYYY')), 50) ELSE s.employ_no END,
  CASE WHEN 'employee_phone' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.employee_phone, ('_' || to_char(now(), 'YYYY')), 40) ELSE s.employee_phone END,
  CASE WHEN 'student_no' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.student_no, ('_' || to_char(now(), 'YYYY')), 50) ELSE s.student_no END,
  CASE WHEN 'student_phone' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.student_phone, ('_' || to_char(now(), 'YYYY')), 40) ELSE s.student_phone END,
  CASE WHEN 'drivers_license_num' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.drivers_license_num, ('_' || to_char(now(), 'YYYY')), 50) ELSE s.drivers_license_num END,
  CASE WHEN 'drivers_license_prov' = ANY($4) AND (s.active IS FALSE AND $3) THEN mui_suffix(s.drivers_license_prov, ('_' || to_char(now(), 'YYYY')), 50) ELSE s.drivers_license_prov END,
  s.date_of_birth, COALESCE(s.active, TRUE),
  CASE WHEN (s.active IS FALSE AND $3) THEN now() END, CASE WHEN (s.active IS FALSE AND $3) THEN ('_' || to_char(now(), 'YYYY')) END,
  $2, s.row_no, s.row_digest
FROM users_stage s
ORDER BY s.unique_id
ON CONFLICT (tenant_id, unique_id) DO NOTHING
RETURNING last_row, (archived_at IS NOT NULL) AS archived
