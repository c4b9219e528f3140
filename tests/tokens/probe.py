#!/usr/bin/env python3
"""Prints the HTTP status a registry answers METHOD URL with `Authorization: Bearer $TOKEN`
(the token from the environment, never the command line), trusting CA only."""
import os
import ssl
import sys
import urllib.error
import urllib.request

ca, method, url = sys.argv[1:4]
request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
request.add_header("Authorization", "Bearer " + os.environ["TOKEN"])
try:
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=ca)) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
