"""Signing a resolution: ``ssh-keygen -Y sign`` in namespace ``escalate``, with a private key
file or, given the public half, the key ssh-agent holds (``SSH_AUTH_SOCK``). What is signed
and how it is checked: :mod:`escalate.core.sshsig`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from escalate.core.sshsig import BEGIN, NAMESPACE
from escalate.errors import InputError


def sign(message: bytes, keyfile: str | os.PathLike[str]) -> str:
    """An armored SSHSIG signature of ``message`` made by ``ssh-keygen -Y sign`` with
    ``keyfile``: a private key, or the public half of a key held by ssh-agent
    (``SSH_AUTH_SOCK``). :class:`InputError` saying what went wrong otherwise."""
    path = Path(keyfile)
    if not path.is_file():
        raise InputError(f"no key file {str(keyfile)[:200]}: give --sign a private key file, or the .pub "
                         "of a key in ssh-agent", code="invalid_key", value=str(keyfile)[:200])
    try:
        done = subprocess.run(["ssh-keygen", "-Y", "sign", "-q", "-n", NAMESPACE, "-f", str(path)],
                              input=message, capture_output=True, timeout=300, check=False)
    except FileNotFoundError:
        raise InputError("signing needs ssh-keygen (OpenSSH 8.1 or later) on the PATH",
                         code="invalid_key") from None
    except subprocess.TimeoutExpired:
        raise InputError("ssh-keygen did not sign within 5 minutes", code="invalid_key") from None
    text = done.stdout.decode(errors="replace")
    if done.returncode != 0 or BEGIN not in text:
        said = " ".join(done.stderr.decode(errors="replace").split())[:300]
        raise InputError(f"ssh-keygen could not sign with {str(keyfile)[:200]}: {said or 'no signature'}",
                         code="invalid_key", value=str(keyfile)[:200])
    return text


def sign_change(content: bytes | None, keyfile: str | os.PathLike[str]) -> str | None:
    """:func:`sign` a policy change's ``content``; None when it has none (no keys are pinned,
    so the change is not signed: the first pinning is trusted on first use)."""
    return None if content is None else sign(content, keyfile)
