"""``python -m tokprune.integrations.lmms_eval``: register ``tokprune_llava``, run lmms-eval's CLI, fail loudly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .model import MODEL_NAME, TokpruneLlavaCore, register_with_lmms_eval


class LmmsEvalFailedError(RuntimeError):
    """lmms-eval logged an error (or never asked the model anything) and still returned normally."""


class _ErrorLog:
    """Collects the ERROR records lmms-eval logs while it runs (stdlib ``logging`` and loguru).

    lmms-eval resets loguru (``logger.remove()``) when it sets its verbosity, which would drop a sink
    added beforehand: while collecting, a removal of all handlers (or of ours) re-adds ours.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._handler: Any = None
        self._loguru: Any = None
        self._loguru_id: int | None = None

    def _sink(self, message: Any) -> None:
        self.messages.append(str(message).strip())

    def __enter__(self) -> _ErrorLog:
        import logging

        log = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                log.messages.append(record.getMessage())

        self._handler = Handler(level=logging.ERROR)
        logging.getLogger().addHandler(self._handler)
        try:
            from loguru import logger
        except ImportError:
            return self
        self._loguru = logger
        original_remove = logger.remove
        self._loguru_id = logger.add(self._sink, level="ERROR")

        def remove(handler_id: int | None = None) -> None:
            original_remove(handler_id)
            if handler_id is None or handler_id == self._loguru_id:
                self._loguru_id = logger.add(self._sink, level="ERROR")

        logger.remove = remove  # an instance attribute: undone in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger().removeHandler(self._handler)
        if self._loguru is not None:
            vars(self._loguru).pop("remove", None)
            try:
                self._loguru.remove(self._loguru_id)
            except ValueError:  # already removed by someone else
                pass


def main(argv: Sequence[str] | None = None, cli: Callable[[], Any] | None = None) -> Any:
    """``python -m tokprune.integrations.lmms_eval <lmms-eval arguments>``: register, then run lmms-eval.

    lmms-eval catches many errors (a task that fails to load, a broken dependency such as filelock 4.x)
    logs them and still exits 0. So this entry point fails loudly instead: it raises
    :class:`LmmsEvalFailedError` (exit status 1) when lmms-eval logged an error, or finished without
    asking ``tokprune_llava`` for a single answer.
    """
    import sys

    register_with_lmms_eval()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if cli is None:
        from lmms_eval.__main__ import cli_evaluate as cli
    answered = TokpruneLlavaCore.answered_in_process
    with _ErrorLog() as errors:
        result = cli()
    if errors.messages:
        shown = "; ".join(m.splitlines()[0] for m in errors.messages[:3])
        raise LmmsEvalFailedError(
            f"lmms-eval logged {len(errors.messages)} error(s) and returned as if it had succeeded: {shown}. "
            "Its results are incomplete; see the log above (docs/index.md, 'Evaluating with lmms-eval')"
        )
    if TokpruneLlavaCore.answered_in_process == answered:
        raise LmmsEvalFailedError(
            f"lmms-eval finished without asking {MODEL_NAME} for a single answer: check --model, --tasks and the "
            "log above (a task that failed to load is skipped silently by some lmms-eval versions)"
        )
    return result
