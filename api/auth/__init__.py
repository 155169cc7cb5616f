"""Authentication: who is calling (``Principal``) from one of three bearer credentials (``bearer``)."""

from api.auth.bearer import provide_principal
from api.auth.principal import CallerPrincipal, Principal, RateLimiter

__all__ = ["CallerPrincipal", "Principal", "RateLimiter", "provide_principal"]
