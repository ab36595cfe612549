"""Every error the package raises on purpose. Each one means "this input or setting cannot be used" and its
message names the config key, file, sample token or step, so that a command-line tool can print it as one
``error: ...`` line (``fd3d_jax.cli.exit_on``) instead of a traceback. No imports: every layer may use it."""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key (``config.distill.method``)."""


class DataError(ValueError):
    """Unusable input data; the message names the file, sample token or config key."""


class DataConfigError(DataError):
    """A mismatch of the data and the config (too many GT for ``data.max_gt``, no GT for
    ``data.filter_empty_gt``): never skipped by ``data.skip_bad_samples``."""


class RecordsError(ValueError):
    """A records file or split that cannot be used; the message names the file, split or token."""


class CheckpointError(ValueError):
    """A checkpoint or params folder that cannot be read or restored into this config's state; names the
    folder."""


class ExpertError(ValueError):
    """An expert checkpoint that does not fit ``config.expert``; names the path and the mismatches."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss under ``train.nonfinite='stop'``); names the step and the last
    good checkpoint."""


class DistributedError(RuntimeError):
    """A multi-host run that cannot start or go on: missing or incomplete ``jax.distributed`` settings, a
    coordinator or peer not reached within the timeout, a peer that stopped mid-run; names the address, this
    process's id and what is missing."""


class ConvertError(ValueError):
    """A checkpoint or params tree that does not fit the config; the message lists every problem, the
    attributes hold one line each: ``unexpected`` (keys/params with no place in the model),
    ``missing`` (checkpoint keys absent, with the model params they leave without a source; or params
    absent), ``mismatched`` (name, given shape, expected shape), ``unmapped`` (gaps between the
    official layout and our model: a config variant the converter does not cover)."""

    def __init__(self, message, unexpected=(), missing=(), mismatched=(), unmapped=()):
        self.unexpected, self.missing = list(unexpected), list(missing)
        self.mismatched, self.unmapped = list(mismatched), list(unmapped)
        super().__init__(message)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was saved (the step's checkpoint, or the last one) and how to
    go on. A ``KeyboardInterrupt``, so that code calling the loop sees the usual interruption; the command line
    prints the message and exits with status 130, the shell's status for Ctrl-C."""


# What a command-line tool reports as one line (exit status 1) rather than a traceback.
USER_ERRORS = (ConfigError, DataError, RecordsError, CheckpointError, ExpertError, TrainingError, ConvertError,
               DistributedError)
