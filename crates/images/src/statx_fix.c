/* Preloaded into debian-slim (/etc/ld.so.preload).
 *
 * This gVisor (runsc 20221219) answers EINVAL to statx() with
 * AT_NO_AUTOMOUNT, which coreutils 9 (Debian bookworm) passes on every
 * `ls`, `cp`, `mv`, `stat`: without this, `ls /` fails with "Invalid
 * argument". A sandbox has no automount points, so dropping the flag changes
 * nothing else.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

int statx(int dirfd, const char *path, int flags, unsigned int mask, struct statx *buf)
{
    return (int)syscall(SYS_statx, dirfd, path, flags & ~AT_NO_AUTOMOUNT, mask, buf);
}
