/* /init of bench_vm.py's guests: touch the guest's RAM, say so, then sleep forever.
 *
 * Built static (gcc -static -O2) and packed alone into an initramfs: no shell, no libc
 * outside the binary. It maps MemAvailable minus a margin (kernel command line
 * "touch_margin_mib=N", default 24) as anonymous memory and writes one word in every 4 KiB
 * page, so that the host has faulted in (nearly) all of the guest's RAM; then it sleeps, as an
 * idle guest does (the vCPU halts: under TCG an idle guest costs the host almost nothing).
 * Progress goes to the serial console, which bench_vm.py reads: "touched N MiB in S s".
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long meminfo_kb(const char *key) {
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':') { v = atol(line + n + 1); break; }
    fclose(f);
    return v;
}

static long cmdline_long(const char *key, long dflt) {
    char buf[4096] = {0};
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0) return dflt;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return dflt;
    char *p = strstr(buf, key);
    if (!p || p[strlen(key)] != '=') return dflt;
    return atol(p + strlen(key) + 1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(void) {
    mkdir("/proc", 0555);
    mount("proc", "/proc", "proc", 0, NULL);
    int con = open("/dev/console", O_WRONLY);
    if (con < 0) con = open("/dev/ttyS0", O_WRONLY);
    if (con >= 0) { dup2(con, 1); dup2(con, 2); }
    setvbuf(stdout, NULL, _IONBF, 0);
    long margin_mib = cmdline_long("touch_margin_mib", 24);
    long avail_kb = meminfo_kb("MemAvailable");
    long total_kb = meminfo_kb("MemTotal");
    long bytes = (avail_kb - margin_mib * 1024) * 1024L;
    printf("guest-init: MemTotal %ld kB, MemAvailable %ld kB, touching %ld MiB\n",
           total_kb, avail_kb, bytes >> 20);
    double t0 = now();
    char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { printf("guest-init: mmap failed\n"); bytes = 0; }
    for (long off = 0; off < bytes; off += 4096) p[off] = (char)(off >> 12 | 1);
    printf("guest-init: touched %ld MiB in %.1f s\n", bytes >> 20, now() - t0);
    for (;;) pause();
}
