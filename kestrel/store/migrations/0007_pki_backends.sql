-- Vault/OpenBao as a second PKI backend (ADR-0011): it holds its CA keys itself, so only built-in CAs
-- store an (encrypted) key; the record of certificates and the audit trail stay here for both.
ALTER TABLE pki_authorities
    ADD COLUMN backend text NOT NULL DEFAULT 'builtin' CHECK (backend IN ('builtin', 'openbao')),
    ALTER COLUMN key_encrypted DROP NOT NULL,
    ADD CONSTRAINT pki_authorities_key_by_backend CHECK ((backend = 'builtin') = (key_encrypted IS NOT NULL));
