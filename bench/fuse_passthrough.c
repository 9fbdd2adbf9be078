/* The least a FUSE filesystem can do, as a yardstick for the capture-seq benchmark.
 *
 * A libfuse 3 high-level passthrough mounted over a directory itself: each request is
 * performed on the real directory through a descriptor opened before mounting, as
 * capture/fuse.py does, but nothing is captured (no event, no log, no applier) and the
 * handlers are C. It shows what the kernel's FUSE path costs by itself on this machine:
 * the write copied into the mount's page cache, then to the daemon, then into the real
 * file. Same settings as the capture: no writeback cache, 1 MiB writes, attribute and
 * entry timeouts of 1 s.
 *
 * Only what the benchmark's workload needs (fio creating, writing, syncing and removing
 * files; listing a directory): other operations answer ENOSYS.
 *
 * Usage: fuse_passthrough [libfuse options] DIR
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

static int real_root = -1;

/* "/a/b" -> "a/b" relative to real_root; the mount root -> "." */
static const char *rel(const char *path) { return path[1] ? path + 1 : "."; }

static int neg_errno(int rc) { return rc < 0 ? -errno : rc; }

static void *pt_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    conn->max_write = 1 << 20;
    conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
    cfg->attr_timeout = 1.0;
    cfg->entry_timeout = 1.0;
    cfg->negative_timeout = 0.0;
    return NULL;
}

static int pt_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    if (fi)
        return neg_errno(fstat((int)fi->fh, st));
    return neg_errno(fstatat(real_root, rel(path), st, AT_SYMLINK_NOFOLLOW));
}

static int pt_open(const char *path, struct fuse_file_info *fi) {
    int fd = openat(real_root, rel(path), fi->flags | O_NOFOLLOW);
    if (fd < 0)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int pt_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    int fd = openat(real_root, rel(path), fi->flags | O_CREAT | O_NOFOLLOW, mode);
    if (fd < 0)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int pt_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    return neg_errno((int)pread((int)fi->fh, buf, size, off));
}

static int pt_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    return neg_errno((int)pwrite((int)fi->fh, buf, size, off));
}

static int pt_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    if (fi)
        return neg_errno(ftruncate((int)fi->fh, size));
    int fd = openat(real_root, rel(path), O_WRONLY | O_NOFOLLOW);
    if (fd < 0)
        return -errno;
    int rc = neg_errno(ftruncate(fd, size));
    close(fd);
    return rc;
}

static int pt_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    return neg_errno(datasync ? fdatasync((int)fi->fh) : fsync((int)fi->fh));
}

static int pt_release(const char *path, struct fuse_file_info *fi) {
    close((int)fi->fh);
    return 0;
}

static int pt_unlink(const char *path) { return neg_errno(unlinkat(real_root, rel(path), 0)); }

static int pt_mkdir(const char *path, mode_t mode) { return neg_errno(mkdirat(real_root, rel(path), mode)); }

static int pt_rmdir(const char *path) { return neg_errno(unlinkat(real_root, rel(path), AT_REMOVEDIR)); }

static int pt_statfs(const char *path, struct statvfs *st) { return neg_errno(fstatvfs(real_root, st)); }

static int pt_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    int fd = openat(real_root, rel(path), O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
    if (fd < 0)
        return -errno;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return -errno;
    }
    struct dirent *e;
    while ((e = readdir(dir)) != NULL)
        if (fill(buf, e->d_name, NULL, 0, 0))
            break;
    closedir(dir);
    return 0;
}

static const struct fuse_operations ops = {
    .init = pt_init,       .getattr = pt_getattr, .open = pt_open,       .create = pt_create,
    .read = pt_read,       .write = pt_write,     .truncate = pt_truncate, .fsync = pt_fsync,
    .release = pt_release, .unlink = pt_unlink,   .mkdir = pt_mkdir,     .rmdir = pt_rmdir,
    .statfs = pt_statfs,   .readdir = pt_readdir,
};

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s [libfuse options] DIR\n", argv[0]);
        return 2;
    }
    real_root = open(argv[argc - 1], O_PATH | O_DIRECTORY);
    if (real_root < 0) {
        perror(argv[argc - 1]);
        return 2;
    }
    return fuse_main(argc, argv, &ops, NULL);  /* DIR is also the mountpoint */
}
