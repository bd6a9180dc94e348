"""Which sections of a binary a running process holds resident, by ELF section: the pages of its
mappings of the binary present in /proc/PID/pagemap, file-backed ones under the mapping's
permissions, copied ones (relocated: anonymous memory) marked "copied".
Usage: resident-sections.py PID BINARY (root)."""
import sys, struct, subprocess, re
pid, binpath = sys.argv[1], sys.argv[2]
secs = []
out = subprocess.run(['readelf', '-S', '-W', binpath], capture_output=True, text=True).stdout
for l in out.splitlines():
    m = re.match(r'\s*\[\s*\d+\]\s+(\S+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)', l)
    if m and m.group(2) != 'NOBITS':
        secs.append((m.group(1), int(m.group(4), 16), int(m.group(5), 16)))
res = {}
pm = open(f'/proc/{pid}/pagemap', 'rb')
for l in open(f'/proc/{pid}/maps'):
    p = l.split()
    if len(p) < 6 or not p[5].endswith(binpath.split('/')[-1]): continue
    a, b = (int(x, 16) for x in p[0].split('-')); off = int(p[2], 16)
    for va in range(a, b, 4096):
        pm.seek(va // 4096 * 8)
        e = struct.unpack('Q', pm.read(8))[0]
        if not e >> 63 & 1: continue
        fo = off + va - a
        name = next((n for n, o, s in secs if o <= fo < o + s), '(other)') + ' ' + p[1]
        if not e >> 61 & 1:
            name += ' copied'
        res[name] = res.get(name, 0) + 4
for k, v in sorted(res.items(), key=lambda x: -x[1]): print(f'{v:8d} KiB  {k}')
print(f'{sum(res.values()):8d} KiB  total')
