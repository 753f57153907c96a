"""The counted script in compressed, self-extracting form (what the records do to save code bytes).

    python3 -m tools.dev.selfextract train_gpt.py OUT.py   # OUT.py: lzma + base85, runs the same program
    python3 -m tools.dev.selfextract --check OUT.py train_gpt.py

The wrapper is two lines that decompress the script's exact bytes and exec them in the wrapper's own
module, so `__file__` (and with it the code size and sha256 a run logs) is the wrapper's. It needs
only the standard library. `extracted_source` inverts it, which is how `records.py verify` checks
that a packed wrapper and the readable script beside it are the same program.
"""

import base64
import lzma
import sys
from pathlib import Path

from tools.common import import_trainer

# The wrapper's format is the trainer's rule (its budget preview counts the wrapper's bytes); one place.
_trainer = import_trainer()
PREFIX, SUFFIX = _trainer.WRAPPER_PREFIX, _trainer.WRAPPER_SUFFIX
self_extracting = _trainer.self_extracting


def extracted_source(wrapper: bytes) -> bytes | None:
    """The script a wrapper runs, or None when it is not a wrapper this module wrote."""
    if not (wrapper.startswith(PREFIX) and wrapper.endswith(SUFFIX)):
        return None
    try:
        return lzma.decompress(base64.b85decode(wrapper[len(PREFIX) : -len(SUFFIX)]))
    except (ValueError, lzma.LZMAError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--check":
        wrapper, readable = Path(args[1]).read_bytes(), Path(args[2]).read_bytes()
        same = extracted_source(wrapper) == readable
        print(f"{args[1]} {'runs exactly' if same else 'does NOT run'} {args[2]}")
        return 0 if same else 1
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, out = Path(args[0]).read_bytes(), Path(args[1])
    if out.exists():
        print(f"error: {out} exists (never overwritten)", file=sys.stderr)
        return 2
    out.write_bytes(self_extracting(source))
    print(f"{out}: {out.stat().st_size} bytes (from {len(source)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
