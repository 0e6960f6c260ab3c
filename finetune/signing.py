"""Signed model versions, verified before serving (OpenSSF ``model-signing``, key mode).

Each registered version is signed offline with a local elliptic-curve key (P-256): the
``model-signing`` library hashes every file of a payload directory into a manifest and signs
it as a DSSE envelope in a Sigstore bundle, without any network service. The payload is the
version's adapter directory (every file the app loads) plus ``flywheel_bom.sha256``, the
sha256 of the version's Model BOM (``bom/bom.cdx.json``, :mod:`finetune.bom`), so the
signature covers the model files and the BOM's digest. The bundle is logged on the version's
run as ``signature/model.sig``; the version is tagged with the key's fingerprint
(``flywheel.signing_key``: sha256 of the public key PEM, as the bundle's key hint).

Why ``model-signing`` in key mode rather than a hand-made in-toto statement: it is the
OpenSSF format model hubs and serving stacks are converging on, its manifest names every file
(so a refusal can say which file changed), and key mode needs no network, which a plant's
air-gapped serving cluster requires.

Serving verifies before it loads (:func:`verify_version`, called by the Serve app when
``serve.require_signature`` is on) and refuses a missing signature, one made with another key,
or a file changed after signing, with the reason; the version it was serving keeps serving.

Keys: ``flywheel keys init`` writes ``<workdir>/keys/signing.key`` (PEM, readable by the owner
only) and ``signing.pub``; a demo campaign creates them on first use. In production bring your
own key: ``train.signing_key`` (the private key, where training runs) and
``serve.signing_public_key`` (where serving runs).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from flywheel.base.errors import FlywheelError

SIGNATURE_ARTIFACT = "signature/model.sig"
BOM_DIGEST_FILE = "flywheel_bom.sha256"
KEY_TAG = "flywheel.signing_key"
PRIVATE_KEY, PUBLIC_KEY = "signing.key", "signing.pub"


class SignatureError(FlywheelError, ValueError):
    """A version's signature is missing, made with another key, or does not match its files."""


class UnsignedError(SignatureError):
    """A version has no signature on its run (yet: ``sign_registered`` can still add one)."""


def init_keys(directory: str | os.PathLike, force: bool = False) -> tuple[Path, Path]:
    """Create a P-256 key pair in ``directory`` (``signing.key``, mode 0600, and ``signing.pub``).
    An existing pair is kept unless ``force``: replacing it makes every signature so far unverifiable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    priv, pub = d / PRIVATE_KEY, d / PUBLIC_KEY
    if priv.exists() and not force:
        if not pub.exists():
            raise SignatureError(f"{priv} exists but {pub} does not; restore it, or `flywheel keys init --force` "
                                 "for a new pair (versions signed with the old key will no longer verify)")
        return priv, pub
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def fingerprint(public_key: str | os.PathLike) -> str:
    """sha256 of the public key's PEM (the key hint ``model-signing`` puts in each bundle)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def public_of(private_key: str | os.PathLike) -> bytes:
    """The public key PEM of a private key file; :class:`SignatureError` naming the fix when the
    file is missing or not an unencrypted PEM private key."""
    from cryptography.hazmat.primitives import serialization

    path = Path(private_key)
    if not path.is_file():
        raise SignatureError(f"no signing key at {path}: create one with `flywheel keys init` or point "
                             "train.signing_key at yours")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path} is not an unencrypted PEM private key ({exc}); create one with "
                             "`flywheel keys init` or point train.signing_key at yours") from None
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _payload(adapter_dir: str | os.PathLike, bom_text: str, dst: Path) -> Path:
    """The signed payload: the adapter's files plus the BOM's sha256."""
    shutil.copytree(adapter_dir, dst)
    (dst / BOM_DIGEST_FILE).write_text(hashlib.sha256(bom_text.encode()).hexdigest() + "\n")
    return dst


def sign_payload(adapter_dir: str | os.PathLike, bom_text: str, private_key: str | os.PathLike,
                 signature_path: str | os.PathLike) -> None:
    """Sign the adapter's files and the BOM's digest with ``private_key`` into ``signature_path``."""
    from model_signing import signing

    key = Path(private_key)
    public_of(key)                    # a missing or unreadable key: refused, naming the fix
    with tempfile.TemporaryDirectory(prefix="flywheel-sign-") as tmp:
        payload = _payload(adapter_dir, bom_text, Path(tmp) / "payload")
        signing.Config().use_elliptic_key_signer(private_key=key).sign(payload, signature_path)


def verify_payload(adapter_dir: str | os.PathLike, bom_text: str, public_key: str | os.PathLike,
                   signature_path: str | os.PathLike, what: str = "the model") -> None:
    """Raise :class:`SignatureError` unless ``signature_path`` signs exactly these files and BOM with
    the key pair of ``public_key``."""
    from model_signing import verifying

    if not Path(public_key).is_file():
        raise SignatureError(f"no public key at {public_key} to verify {what}: copy the signer's signing.pub "
                             "there, or set serve.signing_public_key")
    with tempfile.TemporaryDirectory(prefix="flywheel-verify-") as tmp:
        payload = _payload(adapter_dir, bom_text, Path(tmp) / "payload")
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key)).verify(payload, signature_path)
        except ValueError as exc:
            msg = str(exc)
            if "Key mismatch" in msg or "does not match the provided public key" in msg:
                raise SignatureError(f"{what} was signed with another key (not the one at {public_key}); "
                                     "serve with the signer's public key, or re-sign the version") from None
            if "Signature mismatch" in msg:
                raise SignatureError(f"{what} does not match its signature - changed after signing: "
                                     f"{msg.removeprefix('Signature mismatch: ')}") from None
            raise SignatureError(f"{what}: signature invalid ({msg})") from None
        except Exception as exc:  # noqa: BLE001 - a corrupt bundle raises protobuf / JSON errors
            raise SignatureError(f"{what}: unreadable signature ({type(exc).__name__}: {exc})") from None


def sign_version(client, run_id: str, adapter_dir: str | os.PathLike, bom_text: str,
                 private_key: str | os.PathLike) -> str:
    """Sign a version's adapter and BOM and log the bundle on its run; returns the key fingerprint."""
    with tempfile.TemporaryDirectory(prefix="flywheel-sig-") as tmp:
        sig = Path(tmp) / Path(SIGNATURE_ARTIFACT).name
        sign_payload(adapter_dir, bom_text, private_key, sig)
        client.log_artifact(run_id, str(sig), str(Path(SIGNATURE_ARTIFACT).parent))
    return hashlib.sha256(public_of(private_key)).hexdigest()


def verify_version(tracking_uri: str, model_name: str, version: str, adapter_dir: str | os.PathLike,
                   public_key: str | os.PathLike) -> None:
    """Verify a registered version's adapter (already downloaded to ``adapter_dir``) against the
    signature and BOM logged on its run; :class:`SignatureError` with the reason otherwise."""
    from finetune.bom import BOM_ARTIFACT
    from finetune.registry import _client, get_version

    what = f"{model_name} v{version}"
    info = get_version(tracking_uri, model_name, str(version))
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="flywheel-verify-") as tmp:
        try:
            sig = client.download_artifacts(info.run_id, SIGNATURE_ARTIFACT, tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise UnsignedError(f"{what} is not signed (no {SIGNATURE_ARTIFACT} on run {info.run_id}); sign it "
                                 "at registration (train.signing_key) or set serve.require_signature=false") from None
        try:
            bom_text = Path(client.download_artifacts(info.run_id, BOM_ARTIFACT, tmp)).read_text()
        except Exception:  # noqa: BLE001
            raise SignatureError(f"{what} has a signature but no {BOM_ARTIFACT} on run {info.run_id}: the "
                                 "signature covers the BOM, so it cannot be checked") from None
        verify_payload(adapter_dir, bom_text, public_key, sig, what)


def sign_registered(tracking_uri: str, model_name: str, version: str, private_key: str | os.PathLike) -> str:
    """Sign a version registered without a signature (by another tool, or before signing was on):
    logs its BOM on its run if it has none, signs its served files with that BOM, tags the key.
    Returns the key fingerprint."""
    import json

    from finetune.bom import BOM_ARTIFACT, model_bom
    from finetune.registry import _client, fetch_adapter, get_version

    info = get_version(tracking_uri, model_name, str(version))
    client = _client(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="flywheel-sign-") as tmp:
        try:
            bom_text = Path(client.download_artifacts(info.run_id, BOM_ARTIFACT, tmp)).read_text()
        except Exception:  # noqa: BLE001 - no BOM logged yet
            bom_text = json.dumps(model_bom(tracking_uri, model_name, str(version)), indent=2)
            client.log_text(info.run_id, bom_text, BOM_ARTIFACT)
        adapter = fetch_adapter(tracking_uri, model_name, str(version), str(Path(tmp) / "adapter"))
        fp = sign_version(client, info.run_id, adapter, bom_text, private_key)
    client.set_model_version_tag(model_name, str(version), KEY_TAG, fp)
    return fp
