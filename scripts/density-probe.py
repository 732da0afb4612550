#!/usr/bin/env python3
# Per-device cost of what listOwned and restore's in-use scan do, at growing numbers of
# live snapshots, measured in-process (libdevmapper through ctypes, sysfs through open/read),
# and the in-use lease check's answers. Run in the VM rig as root, e.g.
#   scripts/vm-run.sh -- python3 scripts/density-probe.py 100 200 400
# Each snapshot: a 64 MiB sparse CoW file on its own loop device over one shared 64 MiB
# origin loop device, named probe-K with UUID SBXSNAP-probe-K; all are removed at the end.
# docs/benchmarks.md ("Density") has a run.
import os, fcntl, time, sys, ctypes, errno
from ctypes import c_void_p, c_int, c_char_p, c_uint64
LOOP_CTL_GET_FREE=0x4C82; LOOP_SET_FD=0x4C00; LOOP_CLR_FD=0x4C01
F_SETLEASE=1024; F_WRLCK=1; F_UNLCK=2; F_RDLCK=0
CREATE,INFO,STATUS,TABLE,LIST,REMOVE=0,6,10,11,13,2
dm=ctypes.CDLL("libdevmapper.so.1.02.1", use_errno=True)
dm.dm_task_create.restype=c_void_p; dm.dm_task_create.argtypes=[c_int]
for f in ("dm_task_set_name","dm_task_set_uuid"): getattr(dm,f).argtypes=[c_void_p,c_char_p]
dm.dm_task_add_target.argtypes=[c_void_p,c_uint64,c_uint64,c_char_p,c_char_p]
dm.dm_task_run.argtypes=[c_void_p]; dm.dm_task_destroy.argtypes=[c_void_p]
dm.dm_task_skip_lockfs.argtypes=[c_void_p]; dm.dm_task_no_open_count.argtypes=[c_void_p]
class Info(ctypes.Structure):
    _fields_=[("exists",c_int),("suspended",c_int),("live_table",c_int),("inactive_table",c_int),("open_count",ctypes.c_int32),("event_nr",ctypes.c_uint32),("major",ctypes.c_uint32),("minor",ctypes.c_uint32),("read_only",c_int),("target_count",ctypes.c_int32),("deferred_remove",c_int),("internal_suspend",c_int)]
dm.dm_task_get_info.argtypes=[c_void_p,ctypes.POINTER(Info)]
dm.dm_task_get_uuid.restype=c_char_p; dm.dm_task_get_uuid.argtypes=[c_void_p]
dm.dm_get_next_target.restype=c_void_p; dm.dm_get_next_target.argtypes=[c_void_p,c_void_p,ctypes.POINTER(c_uint64),ctypes.POINTER(c_uint64),ctypes.POINTER(c_char_p),ctypes.POINTER(c_char_p)]
def task(kind,name,skip=False):
    t=dm.dm_task_create(kind); dm.dm_task_set_name(t,name.encode())
    if skip: dm.dm_task_no_open_count(t)
    assert dm.dm_task_run(t)==1
    if kind==INFO:
        i=Info(); dm.dm_task_get_info(t,ctypes.byref(i)); u=dm.dm_task_get_uuid(t)
    else:
        s=c_uint64();l=c_uint64();ty=c_char_p();p=c_char_p()
        dm.dm_get_next_target(t,None,ctypes.byref(s),ctypes.byref(l),ctypes.byref(ty),ctypes.byref(p)); u=p.value
    dm.dm_task_destroy(t); return u
tmp=os.environ.get("DM_TEST_TMPDIR","/tmp")
ctl=os.open("/dev/loop-control",os.O_RDWR)
def attach(path,size,ro=False):
    i=fcntl.ioctl(ctl,LOOP_CTL_GET_FREE)
    fd=os.open(path,(os.O_RDONLY if ro else os.O_RDWR)|os.O_CREAT); os.ftruncate(fd,size) if not ro else None
    lfd=os.open(f"/dev/loop{i}",os.O_RDWR)
    fcntl.ioctl(lfd,LOOP_SET_FD,fd); os.close(fd); os.close(lfd); 
    return i
def rd(p):
    fd=os.open(p,os.O_RDONLY); b=os.read(fd,4096); os.close(fd); return b.decode().strip()
def clr(i):
    lfd=os.open(f"/dev/loop{i}",os.O_RDWR); fcntl.ioctl(lfd,LOOP_CLR_FD); os.close(lfd)
SIZE=64<<20
oi=attach(f"{tmp}/origin",SIZE)
odev=rd(f"/sys/block/loop{oi}/dev")
devs=[]  # (name, loopindex)
def make_one(k):
    ci=attach(f"{tmp}/cow{k}",SIZE)
    cdev=rd(f"/sys/block/loop{ci}/dev")
    name=f"probe-{k}"
    t=dm.dm_task_create(CREATE); dm.dm_task_set_name(t,name.encode()); dm.dm_task_set_uuid(t,f"SBXSNAP-probe-{k}".encode())
    dm.dm_task_add_target(t,0,SIZE//512,b"snapshot",f"{odev} {cdev} P 8".encode())
    assert dm.dm_task_run(t)==1, ctypes.get_errno(); dm.dm_task_destroy(t)
    devs.append((name,ci))
def timeit(label,f,items):
    t0=time.perf_counter()
    for x in items: f(x)
    dt=time.perf_counter()-t0
    print(f"  {label:34s} {dt*1e6/max(1,len(items)):9.1f} us each ({len(items)})",flush=True); return dt
def loopindex(devnum):
    for line in rd(f"/sys/dev/block/{devnum}/uevent").split("\n"):
        if line.startswith("DEVNAME=loop"): return int(line[12:])
def list_names():
    t=dm.dm_task_create(LIST); assert dm.dm_task_run(t)==1; dm.dm_task_destroy(t)
def adopt(name):
    task(INFO,name); p=task(TABLE,name,True).decode().split(); task(STATUS,name,True)
    ci=loopindex(p[1]); rd(f"/sys/block/loop{ci}/loop/backing_file")
    o=loopindex(p[0]); rd(f"/sys/block/loop{o}/loop/backing_file")
def scan(_):
    for n in os.listdir("/sys/block"):
        if not n.startswith("loop"): continue
        try: b=rd(f"/sys/block/{n}/loop/backing_file")
        except OSError: continue
        os.stat(b)
def lease(path):
    fd=os.open(path,os.O_RDWR)
    try:
        fcntl.fcntl(fd,F_SETLEASE,F_WRLCK); fcntl.fcntl(fd,F_SETLEASE,F_UNLCK); return True
    except OSError as e: return e.errno
    finally: os.close(fd)
for level in [int(a) for a in sys.argv[1:]]:
    t0=time.perf_counter()
    while len(devs)<level: make_one(len(devs))
    print(f"N={level} snapshots (made in {time.perf_counter()-t0:.1f}s)",flush=True)
    sample=[n for n,_ in devs[-50:]]
    timeit("DM_DEVICE_LIST",lambda _: list_names(),[0,1,2])
    timeit("info",lambda n: task(INFO,n),sample)
    timeit("table",lambda n: task(TABLE,n,True),sample)
    timeit("status",lambda n: task(STATUS,n,True),sample)
    timeit("cow uevent (loopIndex)",lambda n: loopindex(task(TABLE,n,True).decode().split()[1]),sample)
    timeit("origin uevent",lambda n: loopindex(odev),sample)
    timeit("origin backing_file",lambda n: rd(f"/sys/block/loop{oi}/loop/backing_file"),sample)
    timeit("adopt emulation (all N)",adopt,[n for n,_ in devs])
    timeit("in-use scan (per loop dev)",lambda _: scan(0),[0])
    timeit("write lease probe",lambda k: lease(f"{tmp}/cow{k}"),list(range(10)))
# correctness of the lease probe
print("lease on an attached store:", lease(f"{tmp}/cow0"))
open(f"{tmp}/free","wb").truncate(SIZE)
print("lease on a free store:", lease(f"{tmp}/free"))
ri=attach(f"{tmp}/free",SIZE,ro=True)
print("lease on a store attached read-only:", lease(f"{tmp}/free"))
clr(ri); time.sleep(0.2)
print("lease after detach:", lease(f"{tmp}/free"))
for name,ci in devs:
    t=dm.dm_task_create(REMOVE); dm.dm_task_set_name(t,name.encode()); dm.dm_task_run(t); dm.dm_task_destroy(t); clr(ci)
clr(oi); print("done",flush=True)
