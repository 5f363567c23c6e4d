#!/usr/bin/env python3
"""Builds jwks.json (public JWKs) from the test key pairs in this folder.

The pairs were made with openssl (genpkey: RSA 2048, EC P-256/P-384, Ed25519); they are
test fixtures, never used anywhere else. Run after regenerating a pair.
"""
import base64, json, pathlib
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

here = pathlib.Path(__file__).parent

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

def uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")

def jwk(name: str, kid: str, alg: str) -> dict:
    key = serialization.load_pem_public_key((here / f"{name}.pub.pem").read_bytes())
    out = {"kid": kid, "alg": alg, "use": "sig"}
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        out |= {"kty": "RSA", "n": b64(uint(nums.n)), "e": b64(uint(nums.e))}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        nums = key.public_numbers()
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[key.curve.name]
        out |= {"kty": "EC", "crv": crv, "x": b64(nums.x.to_bytes(size, "big")), "y": b64(nums.y.to_bytes(size, "big"))}
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        out |= {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
    return out

keys = [
    jwk("rsa-a", "rsa-a", "RS256"),
    jwk("rsa-b", "rsa-b", "RS256"),
    jwk("ec-p256", "ec-p256", "ES256"),
    jwk("ec-p384", "ec-p384", "ES384"),
    jwk("ed25519", "ed25519", "EdDSA"),
]
(here / "jwks.json").write_text(json.dumps({"keys": keys}, indent=2) + "\n")
