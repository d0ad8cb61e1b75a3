"""Run by tests/test_generations.py with the MCP Python SDK 2.x's own interpreter
(target/sdk2-venv; it cannot share a virtualenv with the 1.x the other suites use).

    sdk2_client.py URL MODE HEADER  (the credential is read from stdin, never argv)

Connects with `mcp.Client` in MODE ("auto", or a version pin such as "2026-07-28"),
lists the tools, calls search_documents, and prints what it saw as one JSON line."""

import json
import sys

import anyio
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url, mode, header, credential):
    value = f"Bearer {credential}" if header == "Authorization" else credential
    verify = not url.startswith("https://")
    async with httpx2.AsyncClient(headers={header: value}, verify=verify, timeout=httpx2.Timeout(60, read=300)) as http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
            tools = await client.list_tools()
            search = await client.call_tool("search_documents", {"query": "note"})
            info = client.server_info
            return {
                "protocol_version": client.protocol_version,
                "server_name": info.name if info else None,
                "tools": sorted(t.name for t in tools.tools),
                "search": "\n".join(c.text for c in search.content if hasattr(c, "text")),
                "is_error": bool(search.is_error),
            }


if __name__ == "__main__":
    url, mode, header = sys.argv[1:4]
    credential = sys.stdin.readline().strip()
    print(json.dumps(anyio.run(main, url, mode, header, credential)))
