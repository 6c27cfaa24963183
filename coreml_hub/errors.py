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


class UnsupportedModel(CoremlHubError):
    """A Core ML model of a kind the portable runtime does not run (it runs ML Programs only)."""

    default_hint = ("Convert the model to an ML Program (coremltools: convert_to='mlprogram'), "
                    "or run it with Core ML on macOS (`--backend coreml`).")


class ModelInputError(CoremlHubError):
    """Inputs given to a model's predict do not match its description (names, shapes, types)."""

    default_hint = "Compare with the model's input_description (name, shape, dtype)."


class BackendUnavailable(CoremlHubError):
    default_hint = "Run `coreml-hub plugins` to see the backends and why each is (un)available."


class InvalidImage(CoremlHubError):
    """An input image (e.g. `run --image`) that cannot be read."""

    default_hint = "Pass a PNG or JPEG file."


class UnsupportedSize(CoremlHubError):
    """A size the model cannot make or take (its shapes are fixed at conversion)."""

    default_hint = "Use an image of the model's size, or a variant converted for the size you need."


class NoTaskFound(CoremlHubError):
    """`run` found no task that knows what to do with a model."""

    default_hint = "Run it once with `coreml-hub predict MODEL -i NAME=VALUE`, or name a task with --task."


class AmbiguousTask(UsageError):
    """More than one task claims a model equally: `run` needs --task."""


class ConversionError(CoremlHubError):
    pass


class UnsupportedArchitecture(ConversionError):
    default_hint = "coreml-hub converts Stable Diffusion 1.x/2.x and SDXL diffusers pipelines."


_CONNECTION_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                      "RemoteProtocolError", "ReadError", "WriteError", "NetworkError", "ProxyError", "TooManyRedirects"}


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from, outermost first (no cycles)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _endpoint_of(exc: BaseException, endpoint: str | None) -> str:
    """Scheme and host the failing request went to, else the endpoint the caller named."""
    try:
        url = getattr(getattr(exc, "request", None), "url", None)
        if url is not None:
            scheme, _, rest = str(url).partition("://")
            return f"{scheme}://{rest.split('/', 1)[0]}"
    except Exception:  # pragma: no cover - a request without a readable url
        pass
    return endpoint or "the Hub (HF_ENDPOINT)"


def unreachable_hint(where: str) -> str:
    return f"Check your network or HF_ENDPOINT (now {where}); set HF_HUB_OFFLINE=1 to use only pulled models."


def _repo_of(exc: BaseException) -> str | None:
    repo_id = getattr(exc, "repo_id", None)
    return repo_id if isinstance(repo_id, str) and repo_id else None


def _translate_one(exc: BaseException, repo: str | None, revision: str | None,
                   endpoint: str | None) -> CoremlHubError | None:
    if isinstance(exc, CoremlHubError):
        return exc
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    detail = getattr(exc, "server_message", None) or text
    repo = repo or _repo_of(exc)
    named = f" {repo}" if repo else ""
    if isinstance(exc, hf_errors.GatedRepoError):
        if repo:
            return GatedRepo(f"{repo} is gated on {_endpoint_of(exc, endpoint)}: downloading it needs an access "
                             "token that was granted access.")
        return GatedRepo(f"The repo is gated and needs an access token with access to it ({detail}).")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        if repo:
            return RepoNotFound(f"Repository {repo} not found on {_endpoint_of(exc, endpoint)} "
                                "(or it is private and no valid token was sent).")
        return RepoNotFound(f"Repository not found: {text}")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        if repo and revision:
            return RevisionNotFound(f"Revision {revision!r} not found in {repo}.")
        return RevisionNotFound(f"Revision not found in{named}: {detail}")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        return None  # says "not in the local cache"; the reason (offline, refused connection) is its cause
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return EntryNotFound(f"File not found in the repo{named}: {text}")
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return OfflineError(f"HF_HUB_OFFLINE is set and this needs the Hub: {text}")
    if isinstance(exc, hf_errors.HFValidationError):
        return UsageError(f"Invalid repo id or revision: {text}",
                          hint="Repo ids look like `org/name`, e.g. apple/coreml-stable-diffusion-v1-5.")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = ("The Hub is having trouble; try again in a moment." if isinstance(status, int) and status >= 500
                else None)
        said = getattr(exc, "server_message", None)  # e.g. a mirror naming its unreachable upstream
        said = f" ({said.strip()})" if isinstance(said, str) and said.strip() and said.strip() not in text else ""
        return CoremlHubError(f"The Hub answered with an error: {text}{said}", hint=hint)
    if type(exc).__name__ in _CONNECTION_ERRORS or isinstance(exc, ConnectionError):
        where = _endpoint_of(exc, endpoint)
        return EndpointUnreachable(f"Cannot reach {where}: {text}", hint=unreachable_hint(where))
    return None


def translate(exc: BaseException, repo_id: str | None = None, revision: str | None = None, *,
              endpoint: str | None = None) -> CoremlHubError | None:
    """Map an exception from huggingface_hub or the HTTP stack to a typed coreml-hub error.

    `repo_id` and `revision` name what was asked for, when the caller knows; `endpoint` is the
    Hub the caller talked to, named in messages when the exception does not carry its URL. Looks through
    the `raise ... from` chain too: huggingface_hub wraps a refused connection into a
    "cannot find the requested files in the local cache" error.
    """
    first: CoremlHubError | None = None
    for item in _cause_chain(exc):
        found = _translate_one(item, repo_id, revision, endpoint)
        if found is None:
            continue
        if first is None:
            first = found
        if type(found) is not CoremlHubError:  # a specific type beats the generic HTTP error
            return found
    return first
