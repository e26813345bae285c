"""A stand-in for a bad network between the add-on and a remote worker, used as the Remote Python in tests.

``python channel_relay.py [--corrupt-once MARKER] [--drop-once MARKER] -- COMMAND...`` runs COMMAND (the real
``python -m backend serve --stdio``) and relays stdin to it and its stdout back, line by line, except:

- ``--corrupt-once MARKER``: the first ``chunk`` event's data has one byte changed (still valid base64), as a
  channel that damages data would; MARKER (a file, created then) makes it happen once across restarts.
- ``--drop-once MARKER``: after the first ``chunk`` event the relay exits with code 255 and kills COMMAND, as ssh
  does when the connection drops mid-transfer; once across restarts, as above.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import threading


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corrupt-once")
    parser.add_argument("--drop-once")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def forward_requests():
        for line in sys.stdin.buffer:
            child.stdin.write(line)
            child.stdin.flush()
        child.stdin.close()

    threading.Thread(target=forward_requests, daemon=True).start()
    out = sys.stdout.buffer
    for line in child.stdout:
        if b'"event":"chunk"' in line:
            if args.corrupt_once and _first_time(args.corrupt_once):
                event = json.loads(line)
                data = bytearray(base64.b64decode(event["data"]))
                data[len(data) // 2] ^= 0x01
                event["data"] = base64.b64encode(bytes(data)).decode("ascii")
                line = (json.dumps(event, separators=(",", ":")) + "\n").encode("utf-8")
            elif args.drop_once and _first_time(args.drop_once):
                out.write(line)
                out.flush()
                child.kill()
                os._exit(255)
        out.write(line)
        out.flush()
    return child.wait()


def _first_time(marker: str) -> bool:
    """True the first time it is asked about ``marker`` (a file it then creates), False after."""
    try:
        with open(marker, "x"):
            return True
    except FileExistsError:
        return False


if __name__ == "__main__":
    sys.exit(main())
