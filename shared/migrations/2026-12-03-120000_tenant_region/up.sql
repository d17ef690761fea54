-- The tenant's country, as a two-letter code (`cz`, `pl`, `ru`): a file that is not UTF-8 is
-- read in the encoding Excel writes there (Windows-1250 for `cz`), which the detector
-- prefers when the text alone is ambiguous. NULL: Western Europe and the Americas
-- (Windows-1252).
ALTER TABLE tenants ADD COLUMN region TEXT CHECK (region ~ '^[a-z]{2}$');
