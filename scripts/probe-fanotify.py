#!/usr/bin/env python3
# Probes fanotify pre-content events (docs/fanotify.md). As root: probe-fanotify.py write|restart
import ctypes, os, struct, sys, time, threading, signal
os.makedirs("/tmp/fanprobe", exist_ok=True)
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
FAN_CLASS_PRE_CONTENT=0x8; FAN_PRE_ACCESS=0x00100000; FAN_MARK_ADD=1; FAN_ALLOW=1; FAN_DENY=2
AT_FDCWD=-100
def init():
    fd = libc.fanotify_init(FAN_CLASS_PRE_CONTENT, os.O_RDWR)
    if fd < 0: sys.exit("init: %s" % os.strerror(ctypes.get_errno()))
    return fd
def mark(g, path):
    r = libc.fanotify_mark(g, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD, path.encode())
    if r < 0: sys.exit("mark: %s" % os.strerror(ctypes.get_errno()))
def events(g):
    buf = os.read(g, 4096)
    off = 0
    while off < len(buf):
        ev_len, vers, _, mlen, mask, fd, pid = struct.unpack_from("IBBHQii", buf, off)
        rng = None
        i = off + mlen
        while i < off + ev_len:
            t, _, l = struct.unpack_from("BBH", buf, i)
            if t == 6: rng = struct.unpack_from("QQ", buf, i + 8)
            i += l
        yield mask, fd, pid, rng
        off += ev_len
def respond(g, fd, resp):
    os.write(g, struct.pack("iI", fd, resp))
F = "/tmp/fanprobe/f"
with open(F, "wb") as f: f.write(b"x" * 65536)
mode = sys.argv[1]
if mode == "write":
    g = init(); mark(g, F)
    seen = []
    def loop():
        for _ in range(4):
            for mask, fd, pid, rng in events(g):
                seen.append((hex(mask), pid, rng)); respond(g, fd, FAN_ALLOW); os.close(fd)
    t = threading.Thread(target=loop, daemon=True); t.start()
    w = os.open(F, os.O_RDWR)
    os.pwrite(w, b"y" * 10, 100)
    time.sleep(0.3)
    print("after pwrite, events:", seen, "(self pid", os.getpid(), ")")
    os.pread(w, 10, 5000); time.sleep(0.3)
    print("after pread, events:", seen)
elif mode == "restart":
    g = init(); mark(g, F)
    holder = os.fork()
    if holder == 0:
        time.sleep(30); os._exit(0)
    # D1: a child that reads one event and dies without answering
    d1 = os.fork()
    if d1 == 0:
        for mask, fd, pid, rng in events(g):
            print("D1 got", hex(mask), pid, rng, "fd", fd, flush=True); open("/tmp/fanprobe/inflight","w").write(str(fd)); break
        os._exit(0)
    os.close(g)  # the parent keeps no group fd now; holder has it
    time.sleep(0.2)
    r = os.fork()
    if r == 0:
        t = time.time(); fd = os.open(F, os.O_RDONLY)
        try:
            b = os.pread(fd, 10, 8192); print("R read", b[:3], "after %.2fs" % (time.time() - t), flush=True)
        except OSError as e:
            print("R error", e, "after %.2fs" % (time.time() - t), flush=True)
        os._exit(0)
    os.waitpid(d1, 0)
    print("D1 exited", flush=True)
    time.sleep(1)
    # D2: take the group fd from the holder
    pidfd = os.pidfd_open(holder)
    g2 = libc.syscall(438, pidfd, g, 0)
    print("D2 got group fd", g2, os.strerror(ctypes.get_errno()) if g2 < 0 else "", flush=True)
    os.set_blocking(g2, False)
    old = int(open("/tmp/fanprobe/inflight").read())
    try:
        respond(g2, old, FAN_ALLOW); print("D2 answered the in-flight event by its fd number", old, flush=True)
    except OSError as e:
        print("D2 answer by number failed:", e, flush=True)
    time.sleep(0.3)
    pid, st = os.waitpid(r, os.WNOHANG)
    print("reader finished after the answer" if pid else "reader still blocked after the answer", flush=True)
    if pid:
        os.kill(holder, 9); sys.exit(0)
    t = time.time()
    while time.time() - t < 3:
        try:
            for mask, fd, pid, rng in events(g2):
                print("D2 got", hex(mask), pid, rng, flush=True); respond(g2, fd, FAN_ALLOW); os.close(fd)
        except BlockingIOError:
            time.sleep(0.05)
    pid, st = os.waitpid(r, os.WNOHANG)
    print("reader finished" if pid else "reader still blocked", flush=True)
    os.kill(holder, 9)
    time.sleep(0.5)
    pid, st = os.waitpid(r, os.WNOHANG)
    print("after the holder died: reader", "finished" if pid else "still blocked", flush=True)
