"""Typed exceptions. The CLI turns each into one `Error:` line, a `Hint:` line and an exit code."""

from __future__ import annotations


class CoremlHubError(Exception):
    """Base class: a failure the user can act on, with an optional hint naming the next step."""

    exit_code = 1
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(CoremlHubError):
    """Bad flags or arguments (exit 2)."""

    exit_code = 2


class RepoNotFound(CoremlHubError):
    default_hint = "Search for it with `coreml-hub list --search NAME`."


class RevisionNotFound(CoremlHubError):
    default_hint = "Omit --revision to use `main`, or run `coreml-hub show REPO` to see what exists."


class EntryNotFound(CoremlHubError):
    pass


class GatedRepo(CoremlHubError):
    default_hint = "Accept the model's terms on the Hub, then set HF_TOKEN (or run `hf auth login`)."


class EndpointUnreachable(CoremlHubError):
    default_hint = "Check your network or HF_ENDPOINT; set HF_HUB_OFFLINE=1 to use only pulled models."


class OfflineError(CoremlHubError):
    default_hint = "Unset HF_HUB_OFFLINE, or use a model listed by `coreml-hub ls`."


class VariantNotFound(CoremlHubError):
    default_hint = "Run `coreml-hub show REPO` to see the variants."


class NoVariants(CoremlHubError):
    default_hint = "This repo holds no Core ML layout coreml-hub knows; see `coreml-hub plugins` for layout plugins."


class ModelNotPulled(CoremlHubError):
    default_hint = "Pull it first with `coreml-hub pull MODEL`, or list pulled models with `coreml-hub ls`."


class NotEnoughDiskSpace(CoremlHubError):
    default_hint = "Free some space, or point COREML_HUB_HOME at a larger disk."


class DownloadError(CoremlHubError):
    default_hint = "Run the same command again: the pull resumes where it stopped."


class UnsafeArchive(CoremlHubError):
    default_hint = "The archive was not extracted; report it to the repo's owner."


class InvalidBundle(CoremlHubError):
    default_hint = "Run `coreml-hub verify PATH` for every problem, or re-pull with `--force`."


class UnsupportedOperation(CoremlHubError):
    """A model uses an ML Program op the portable runtime does not implement."""

    default_hint = "Try the native Core ML backend on macOS (`--backend coreml`), or report the op."


class BackendUnavailable(CoremlHubError):
    default_hint = "Run `coreml-hub plugins` to see the backends and why each is (un)available."


class ConversionError(CoremlHubError):
    pass


class PluginError(CoremlHubError):
    pass


def translate(exc: BaseException) -> CoremlHubError | None:
    """Map an exception from huggingface_hub or the HTTP stack to a typed coreml-hub error."""
    if isinstance(exc, CoremlHubError):
        return exc
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, hf_errors.GatedRepoError):
        return GatedRepo(f"The repo is gated and needs an access token: {text}")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return RepoNotFound(f"Repository not found: {text}")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return RevisionNotFound(f"Revision not found: {text}")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return EntryNotFound(f"File not found in the repo: {text}")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return OfflineError(f"HF_HUB_OFFLINE is set and this needs the Hub: {text}")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return CoremlHubError(f"The Hub answered with an error: {text}")
    name = type(exc).__name__
    if name in {"ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteProtocolError", "ReadError"} or isinstance(
        exc, ConnectionError
    ):
        import os

        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return EndpointUnreachable(f"Cannot reach {endpoint}: {text}")
    return None
