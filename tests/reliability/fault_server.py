"""A tiny MCP stdio server on the standard library alone, built to misbehave on request.

Run as a real child of the gateway (`python fault_server.py [--record FILE]`). It starts in
a few tens of milliseconds (no SDK import), answers requests concurrently (a timer per
slow call), and with `--record FILE` appends every line it receives to FILE, so a test can
see what the gateway sent it (a `notifications/cancelled`, say).

Tools (every argument optional):
  echo(text)                      answer with the text
  pid()                           the child's process id
  sleep(seconds)                  answer after `seconds`, without blocking other requests
  hang()                          never answer (this call; the child keeps serving others)
  gate(path)                      answer "opened" once the file `path` exists (an event the test makes)
  stall()                         stop reading stdin and answering anything, but stay alive
  flood(count, size, kind, pace)  write `count` notifications of about `size` bytes, then answer;
                                  kind "log" (notifications/message, goes to the caller's stream),
                                  "list_changed" (goes to every session's standalone stream);
                                  `pace` seconds of pause every 8 (default 0: one burst)
  garbage()                       write a series of broken lines, then answer normally
  deep(depth)                     write one line of `depth` nested JSON arrays, then answer normally
  oversize(size, id_first)        write one line of `size` bytes answering this call (id first or last)
  emit(lines, raw, answer)        write each of `lines` (strings) as one line, "{id}" in it replaced by
                                  this call's id as JSON, then each of `raw` (bytes in hex); then answer
                                  "after emit", unless answer=false (then a line is meant to answer it)
  close_stdout()                  close stdout and keep running (until stdin ends)
  exit(code)                      exit at once, mid-call
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

RECORD = sys.argv[sys.argv.index("--record") + 1] if "--record" in sys.argv else None
TOOLS = [
    "echo",
    "pid",
    "sleep",
    "hang",
    "gate",
    "stall",
    "flood",
    "garbage",
    "deep",
    "oversize",
    "emit",
    "close_stdout",
    "exit",
]
_lock = threading.Lock()
_out = sys.stdout.buffer


def write_raw(data: bytes) -> None:
    with _lock:
        try:
            _out.write(data)
            _out.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass


def send(message: dict) -> None:
    write_raw(json.dumps(message).encode() + b"\n")


def result(request_id: object, value: dict) -> None:
    send({"jsonrpc": "2.0", "id": request_id, "result": value})


def text(request_id: object, value: str) -> None:
    result(request_id, {"content": [{"type": "text", "text": value}], "isError": False})


def call(request_id: object, name: str, args: dict) -> None:
    if name == "echo":
        text(request_id, str(args.get("text", "")))
    elif name == "pid":
        text(request_id, str(os.getpid()))
    elif name == "sleep":
        timer = threading.Timer(float(args.get("seconds", 1)), text, (request_id, "slept"))
        timer.daemon = True  # stdin EOF ends the process, pending sleeps or not
        timer.start()
    elif name == "hang":
        pass
    elif name == "gate":
        path = str(args.get("path", ""))

        def wait_for_path() -> None:
            while not os.path.exists(path):
                time.sleep(0.02)
            text(request_id, "opened")

        threading.Thread(target=wait_for_path, daemon=True).start()
    elif name == "stall":
        time.sleep(3600)  # wedged: reads nothing more, answers nothing, stays alive
    elif name == "flood":
        count, size, kind = int(args.get("count", 100)), int(args.get("size", 1000)), args.get("kind", "log")
        pace = float(args.get("pace", 0))
        pad = "x" * size
        for n in range(count):
            if pace and n % 8 == 0:
                time.sleep(pace)
            if kind == "list_changed":
                params = {"n": n, "pad": pad}
                send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": params})
            else:
                params = {"level": "info", "logger": "flood", "data": f"{n} {pad}"}
                send({"jsonrpc": "2.0", "method": "notifications/message", "params": params})
        text(request_id, f"flooded {count}")
    elif name == "garbage":
        for line in (
            b"this is not json",
            b"\xff\xfe\xfd not utf-8",
            b"[1, 2, 3]",
            b"42",
            b'"a string"',
            b"null",
            b"{",
            b"",
            b"   ",
            b'{"jsonrpc": "2.0", "id": 999999, "result": {}}',  # an id the gateway never sent
            b'{"jsonrpc": "2.0", "id": "nope", "error": {"code": 1, "message": "x"}}',
            b'{"jsonrpc": "2.0", "method": 5}',
            b'{"jsonrpc": "2.0"}',
            b'{"jsonrpc": "2.0", "id": [1], "result": {}}',
            b'{"jsonrpc": "2.0", "id": 1.5, "result": {}}',
            b'{"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": [1]}}',
            b'{"jsonrpc": "2.0", "method": "notifications/unknown/thing"}',
            b'{"jsonrpc": "2.0", "id": "x", "method": "roots/list"}',  # a request no session can answer
            b"[" * 50 + b"]" * 50,
        ):
            write_raw(line + b"\n")
        text(request_id, "after garbage")
    elif name == "deep":
        depth = int(args.get("depth", 100_000))
        write_raw(b"[" * depth + b"]" * depth + b"\n")
        text(request_id, "after deep")
    elif name == "oversize":
        size = int(args.get("size", 1 << 20))
        body = {"content": [{"type": "text", "text": "y" * size}], "isError": False}
        if args.get("id_first", True):
            message = {"jsonrpc": "2.0", "id": request_id, "result": body}
        else:
            message = {"result": body, "jsonrpc": "2.0", "id": request_id}
        write_raw(json.dumps(message).encode() + b"\n")
    elif name == "emit":
        for line in args.get("lines", []):
            write_raw(str(line).replace("{id}", json.dumps(request_id)).encode() + b"\n")
        for line in args.get("raw", []):
            write_raw(bytes.fromhex(str(line)) + b"\n")
        if args.get("answer", True):
            text(request_id, "after emit")
    elif name == "close_stdout":
        with _lock:
            _out.close()
            os.close(1)
    elif name == "exit":
        os._exit(int(args.get("code", 3)))
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"no tool {name}"}})


def handle(message: dict) -> None:
    method, request_id = message.get("method"), message.get("id")
    if method is None or request_id is None:
        return  # notifications and answers: only recorded
    if method == "initialize":
        result(
            request_id,
            {
                "protocolVersion": message.get("params", {}).get("protocolVersion", "2025-06-18"),
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "fault-server", "version": "1"},
            },
        )
    elif method == "tools/list":
        schema = {"type": "object"}
        result(request_id, {"tools": [{"name": n, "description": n, "inputSchema": schema} for n in TOOLS]})
    elif method == "tools/call":
        params = message.get("params") or {}
        call(request_id, str(params.get("name")), params.get("arguments") or {})
    elif method == "ping":
        result(request_id, {})
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})


def main() -> None:
    record = open(RECORD, "a", buffering=1) if RECORD else None  # noqa: SIM115 - lives as long as we do
    for raw in sys.stdin.buffer:
        if record is not None:
            record.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if isinstance(message, dict):
            handle(message)
    # stdin ended: the gateway is gone or stopping us. Exit like every stdio server.


if __name__ == "__main__":
    main()
