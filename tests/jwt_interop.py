"""Verifies a Tollgate license token with an independent JOSE library (PyJWT + cryptography).

Usage: python3 tests/jwt_interop.py JWKS_FILE TOKEN ACCOUNT
Prints the verified claims as JSON and exits 0, or exits 1 with the reason. Run by
tests/control_plane_tokens.rs; needs `pip install pyjwt cryptography`.
"""
import json
import sys

import jwt


def main() -> int:
    jwks_path, token, account = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(jwks_path, encoding="utf-8") as jwks_file:
        jwks = jwt.PyJWKSet.from_dict(json.load(jwks_file))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(key for key in jwks.keys if key.key_id == kid)
    try:
        claims = jwt.decode(
            token,
            key=key.key,
            algorithms=["EdDSA"],
            issuer="tollgate",
            options={"require": ["exp", "iat", "nbf", "iss", "sub"]},
        )
    except jwt.PyJWTError as error:
        print(f"refused: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if claims["sub"] != account:
        print(f"refused: sub is {claims['sub']!r}, expected {account!r}", file=sys.stderr)
        return 1
    print(json.dumps(claims, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
