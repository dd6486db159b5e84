"""A minimal MCP server in plain JSON lines: it offers tools.listChanged and resource subscriptions,
which the SDK's test server does not, so list_changed and listen streams can be tested."""

from __future__ import annotations

import json
import sys

TOOLS = [
    {"name": "touch", "description": "Announce a tool list change.", "inputSchema": {"type": "object"}},
    {
        "name": "subscriptions",
        "description": "The URIs this process was subscribed to.",
        "inputSchema": {"type": "object"},
    },
    {"name": "crash", "description": "Exit with code 3.", "inputSchema": {"type": "object"}},
    {
        "name": "route",
        "description": "Arguments mirrored into Mcp-Param-* headers (MCP 2026-07-28).",
        "inputSchema": {
            "type": "object",
            "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"},
                "count": {"type": "integer", "x-mcp-header": "Count"},
                "dry": {"type": "boolean", "x-mcp-header": "Dry"},
                "target": {"type": "object", "properties": {"id": {"type": "string", "x-mcp-header": "Id"}}},
                "note": {"type": "string"},
            },
        },
    },
]
subscribed: set[str] = set()


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    if request_id is None:
        continue
    if method == "initialize":
        capabilities = {"tools": {"listChanged": True}, "resources": {"subscribe": True, "listChanged": True}}
        result = {
            "protocolVersion": message["params"]["protocolVersion"],
            "capabilities": capabilities,
            "serverInfo": {"name": "raw-server", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call" and message["params"]["name"] == "subscriptions":
        result = {"content": [{"type": "text", "text": json.dumps(sorted(subscribed))}]}
    elif method == "tools/call" and message["params"]["name"] == "crash":
        sys.exit(3)
    elif method == "tools/call":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        send(
            {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "raw://thing"}}
        )
        result = {"content": [{"type": "text", "text": "touched"}]}
    elif method == "resources/list":
        result = {"resources": [{"uri": "raw://thing", "name": "thing"}]}
    elif method in ("resources/subscribe", "resources/unsubscribe", "ping"):
        if method == "resources/subscribe":
            subscribed.add(message["params"]["uri"])
        elif method == "resources/unsubscribe":
            subscribed.discard(message["params"]["uri"])
        result = {}
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})
        continue
    send({"jsonrpc": "2.0", "id": request_id, "result": result})
