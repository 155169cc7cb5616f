-- An Idempotency-Key is 1-200 of A-Z a-z 0-9 _ . : + / = - (api/preconditions.py IDEMPOTENCY_KEY_CHARS): the API
-- refuses anything else with a 400 before it reaches this table, and the table refuses it too. Keys stored before
-- this rule are left as they are (NOT VALID); they expire with their requests.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_key_check;
ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_key_check
    CHECK (key ~ '^[A-Za-z0-9_.:+/=-]{1,200}$') NOT VALID;
