-- The "file held" mail is claimed before it is sent, as a report is (notify_status
-- 'sending'): two notifiers handling two copies of the "file held" message (the outbox is
-- at-least-once) send it once. The claim expires, so a notifier that died mid-send does not
-- keep the mail from going out.
ALTER TABLE import_files ADD COLUMN hold_notice_claimed_until timestamptz;
