"""Subscribes one relay connection to N topics on a running server and
prints the server's CPU time (utime+stime from /proc/PID/stat) and RSS
before and after. Usage: python3 scripts/subscribe-many.py PORT PID N (start the server with
--max-message-rate 0, and --max-topics-per-connection above N)."""
import os, socket, struct, sys, time, base64

port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
TICK = os.sysconf("SC_CLK_TCK")

def cpu():
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK

def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

def frame(text):
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    if len(data) < 126:
        head += bytes([0x80 | len(data)])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", len(data))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))

s = socket.create_connection(("127.0.0.1", port))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(f"GET /ws?id=many HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(4096)
assert b" 101 " in buf.split(b"\r\n")[0], buf
buf = buf.split(b"\r\n\r\n", 1)[1]

def read_frames(count):
    global buf
    got = 0
    errors = 0
    while got < count:
        while True:
            if len(buf) >= 2:
                ln = buf[1] & 0x7F
                at = 2
                if ln == 126:
                    if len(buf) < 4: break
                    ln = struct.unpack(">H", buf[2:4])[0]; at = 4
                if len(buf) >= at + ln:
                    payload = buf[at:at+ln]
                    if b'"error"' in payload: errors += 1
                    buf = buf[at+ln:]
                    got += 1
                    if got == count: return errors
                    continue
            break
        chunk = s.recv(1 << 16)
        assert chunk, "server closed"
        buf += chunk
    return errors

time.sleep(0.3)
c0, r0, t0 = cpu(), rss(), time.time()
BATCH = 1000
marks = []
errors = 0
for start in range(0, n, BATCH):
    b0 = cpu()
    s.sendall(b"".join(frame(f'{{"type":"subscribe","topic":"t/{i}"}}') for i in range(start, min(n, start + BATCH))))
    errors += read_frames(min(n, start + BATCH) - start)
    marks.append(cpu() - b0)
time.sleep(0.3)
c1, r1, t1 = cpu(), rss(), time.time()
print(f"subscribed {n} topics in {t1-t0:.2f} s wall, errors {errors}")
print(f"server CPU {c1-c0:.2f} s ({(c1-c0)/n*1e6:.1f} us per subscribe)")
print(f"server CPU of the first 1000: {marks[0]:.2f} s, of the last 1000: {marks[-1]:.2f} s")
print(f"server RSS {r0/1e6:.1f} MB -> {r1/1e6:.1f} MB: {(r1-r0)/n:.0f} B per subscription")
s.close()
