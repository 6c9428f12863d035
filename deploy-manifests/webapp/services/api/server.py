"""Example API: answers /health with the version it was deployed at."""
import http.server
import os
import sys

PORT = int(sys.argv[1])
with open(os.path.join(os.path.dirname(__file__), "VERSION")) as f:
    VERSION = f.read().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"ok {VERSION} {os.environ.get('MOORLINE_COMMIT', '-')[:7]}\n".encode()
        self.send_response(200 if self.path in ("/", "/health") else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
