DROP TABLE message_errors;
DROP TABLE dead_letters;
