"""The seed tutorial's threaded server, as users start from: replies data.upper().

    python3 bench/seed_server.py PORT

socketserver reads at most 8,192 bytes per datagram (max_packet_size), so larger
datagrams come back truncated; that is the reference behaviour being measured.
"""
import socketserver
import sys


class Upper(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data.upper(), self.client_address)


if __name__ == "__main__":
    server = socketserver.ThreadingUDPServer(("127.0.0.1", int(sys.argv[1])), Upper)
    server.serve_forever()
