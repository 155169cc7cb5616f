"""PKI: the CA hierarchy and device certificates (built-in backend; Vault/OpenBao to come). ADR-0008."""
