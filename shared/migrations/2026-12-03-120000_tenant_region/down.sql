ALTER TABLE tenants DROP COLUMN region;
