"""Where a shard set lives: a local folder, or a URL that fsspec opens (s3://, gs://, az://, hf://datasets/OWNER/NAME,
https://). The filesystems are the ones the ecosystem keeps up (s3fs, gcsfs, adlfs, huggingface_hub's HfFileSystem,
fsspec's HTTP), installed as extras; credentials come from where each looks for them (the environment, its config
files), and neither this module nor its messages ever name their values.

A URL's set is read the way a folder's is (index.json, then each shard's bytes); `fetch.ShardFetcher` brings shards
to the node, with retries, prefetch, a bounded cache and the sha256 check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from launcher.errors import LauncherError

SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub",
           "http": "aiohttp", "https": "aiohttp", "memory": None, "file": None}
EXTRA = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure", "aiohttp": "http", "huggingface_hub": None}
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.I)


def is_url(value: str | Path) -> bool:
    return bool(_URL.match(str(value)))


def scheme(url: str) -> str:
    match = _URL.match(url)
    return match[1].lower() if match else ""


@dataclass(frozen=True)
class Location:
    """A shard set's root: `root` is a local folder or a URL, without a trailing slash."""

    root: str

    @classmethod
    def of(cls, value: str | Path) -> Location:
        text = str(value)
        if is_url(text):
            if scheme(text) not in SCHEMES:
                raise LauncherError(f"{text}: unknown scheme {scheme(text)!r}; shard sets live in a folder or at "
                                    f"{', '.join(s + '://' for s in SCHEMES if s not in ('memory', 'file'))}")
            return cls(text.rstrip("/"))
        return cls(str(Path(text).expanduser()))

    @property
    def remote(self) -> bool:
        return is_url(self.root)

    def join(self, rel: str) -> str:
        """The address of `rel` under the root (a path, or a URL)."""
        return f"{self.root}/{rel}" if self.remote else str(Path(self.root) / rel)

    def __str__(self) -> str:
        return self.root

    @cached_property
    def fs(self):
        """The fsspec filesystem of a URL (None for a local folder)."""
        if not self.remote:
            return None
        return filesystem(self.root)

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return Path(self.join(rel)).read_bytes()
        try:
            with self.fs.open(self.join(rel), "rb") as f:
                return f.read()
        except Exception as e:  # noqa: BLE001 - every library raises its own: one line naming the cause
            raise LauncherError(explain(self.join(rel), e)) from None


def filesystem(url: str):
    """fsspec's filesystem for `url`, or a LauncherError naming the extra to install."""
    import fsspec

    name = scheme(url)
    try:
        return fsspec.filesystem("https" if name in ("http", "https") else name)
    except (ImportError, ValueError) as e:
        package = SCHEMES.get(name)
        extra = EXTRA.get(package or "")
        how = f"pip install 'whisper-launcher[{extra}]'" if extra else f"pip install {package}"
        raise LauncherError(f"{url}: reading {name}:// needs {package} ({how}): {type(e).__name__}: {e}") from None


def explain(url: str, error: BaseException) -> str:
    """One line for a failure to reach `url`: the missing credential or the unreachable address, by name only."""
    chain, seen = [], error
    while seen is not None and len(chain) < 5:  # fsspec's http turns a refused connection into FileNotFoundError
        chain.append(f"{type(seen).__name__}: {seen}".splitlines()[0][:300])
        seen = seen.__cause__ or seen.__context__
    text, kind, low = chain[-1], scheme(url), " ".join(chain).lower()
    if "nocredentials" in low or "unable to locate credentials" in low or "credentials" in low and "not" in low:
        hint = {"s3": "AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws",
                "gs": "Google credentials: GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default login`",
                "gcs": "Google credentials: GOOGLE_APPLICATION_CREDENTIALS",
                "az": "Azure credentials: AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME + a key",
                "hf": "a Hugging Face token: HF_TOKEN or `huggingface-cli login`"}.get(kind, "credentials")
        return f"{url}: no {hint} found where the library looks for them ({text})"
    if any(w in low for w in ("403", "forbidden", "accessdenied", "access denied", "401", "unauthorized")):
        return f"{url}: access denied with the credentials found (check the token's or key's rights) ({text})"
    if any(w in low for w in ("connect", "resolve", "name or service", "unreachable", "timed out", "timeout")):
        return f"{url}: cannot reach the address (network, endpoint or proxy; AWS_ENDPOINT_URL for an S3-compatible " \
               f"server) ({text})"
    if any(w in low for w in ("404", "not found", "nosuchkey", "nosuchbucket", "filenotfound", "no such file")):
        return f"{url}: no such file or bucket ({text})"
    return f"{url}: {text}"
