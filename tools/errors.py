"""The tools' one error type: bad input to an ``mmssl`` command (an option, a file, an export, a shard set),
printed by the CLI as one ``mmssl: error:`` line with exit code 2, like the rooms' own errors
(`mmssl.pretrain.errors.user_errors`)."""

from __future__ import annotations


class ToolError(ValueError):
    """A command cannot run as asked; the message names the option or file and what was wrong."""
