"""A minimal MCP server in plain JSON lines: it lists the tools given as JSON in argv[1] and answers
every tools/call with "reached <tool>", so tests can hand the gateway any inputSchema."""

import json
import sys

tools = json.loads(sys.argv[1])
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message:
        continue
    method, params = message["method"], message.get("params") or {}
    if method == "initialize":
        result = {
            "protocolVersion": params["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "schemas", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": tools}
    else:
        result = {"content": [{"type": "text", "text": "reached " + params.get("name", "")}]}
    print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
