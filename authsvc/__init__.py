"""authsvc: the brokers' authentication service on the EMQX 5.8 HTTP contract (broker-auth-contract.md)."""
