/*
 * A minimal statically linked VMM for the adoption tests: a KVM VM with N vCPUs, each on its
 * own thread, running a guest that halts in a loop (hlt; jmp back) with interrupts off. With
 * the in-kernel irqchip a halt blocks inside KVM_RUN, so every vCPU thread sits in
 * ioctl(vcpu fd, KVM_RUN) using no CPU, as a VMM's vCPU threads do in an idle guest.
 *
 * Usage: static-vmm NVCPUS [paused]. Prints "ready" once every vCPU runs (or, paused, waits
 * on a condition variable before its first KVM_RUN, like a VMM started with -S); exits at
 * EOF on stdin. It never calls KVM_GET_STATS_FD itself, and no LD_PRELOAD can reach it.
 *
 * It also watches what an adoption must leave exactly as it was, and answers every line on
 * stdin with what it saw: "pong errno=E read_eintr=R sleep_eintr=S sleep_short=T
 * sleeps=N". The main thread sets errno to 4242 and blocks in read(0) with SIGUSR2 blocked
 * (a stray EINTR ends it with "read failed"); a sleeper thread loops over 300 ms
 * clock_nanosleep calls (restarted through restart_block) and counts EINTR returns and
 * sleeps that ended early. The line "go" releases paused vCPUs.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_RAM 0x10000
#define GUEST_CODE 0x1000
#define TSS_ADDR 0xfffbd000

static int vm_fd;
static int run_size;
static int started;
static int paused;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go = PTHREAD_COND_INITIALIZER;
static volatile int sleep_eintr, sleep_short, sleeps;

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *sleeper_main(void *arg)
{
    (void)arg;
    for (;;) {
        struct timespec req = {0, 300000000};
        uint64_t start = now_ns();
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);

        if (rc == EINTR)
            sleep_eintr++;
        else if (now_ns() - start < 300000000u)
            sleep_short++;
        sleeps++;
    }
    return NULL;
}

static void die(const char *what)
{
    fprintf(stderr, "static-vmm: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void *vcpu_main(void *arg)
{
    long id = (long)arg;
    int fd = ioctl(vm_fd, KVM_CREATE_VCPU, id);
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    if (fd < 0)
        die("KVM_CREATE_VCPU");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    if (ioctl(fd, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(fd, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    memset(&regs, 0, sizeof(regs));
    regs.rip = GUEST_CODE;
    regs.rflags = 0x2;
    if (ioctl(fd, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");
    if (id > 0) {
        /* APs would wait for INIT/SIPI; make them halt like the BSP. */
        struct kvm_mp_state mp = {KVM_MP_STATE_RUNNABLE};

        if (ioctl(fd, KVM_SET_MP_STATE, &mp) < 0)
            die("KVM_SET_MP_STATE");
    }
    pthread_mutex_lock(&lock);
    started++;
    while (paused)
        pthread_cond_wait(&go, &lock);
    pthread_mutex_unlock(&lock);
    for (;;) {
        int rc = ioctl(fd, KVM_RUN, 0);

        if (rc < 0 && errno == EINTR)
            continue; /* a signal or a ptrace stop took us out: go back in */
        if (rc < 0)
            die("KVM_RUN");
        fprintf(stderr, "static-vmm: vcpu %ld: exit reason %u\n", id, run->exit_reason);
        pause();
    }
    return NULL;
}

int main(int argc, char **argv)
{
    long vcpus = argc > 1 ? strtol(argv[1], NULL, 10) : 2;
    sigset_t usr2;

    paused = argc > 2 && strcmp(argv[2], "paused") == 0;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &usr2, NULL); /* inherited by every thread */
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);

    if (kvm < 0)
        die("/dev/kvm");
    vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm_fd < 0)
        die("KVM_CREATE_VM");
    unsigned char *ram = mmap(NULL, GUEST_RAM, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap guest RAM");
    static const unsigned char code[] = {0xf4, 0xeb, 0xfd}; /* hlt; jmp back to the hlt */
    memcpy(ram + GUEST_CODE, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = GUEST_RAM,
        .userspace_addr = (unsigned long)ram,
    };
    if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    if (ioctl(vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    pthread_t thread;

    for (long id = 0; id < vcpus; id++) {
        if (pthread_create(&thread, NULL, vcpu_main, (void *)id) != 0)
            die("pthread_create");
    }
    if (pthread_create(&thread, NULL, sleeper_main, NULL) != 0)
        die("pthread_create");
    for (;;) {
        pthread_mutex_lock(&lock);
        int all = started == vcpus;
        pthread_mutex_unlock(&lock);
        if (all)
            break;
        usleep(1000);
    }
    usleep(20000); /* let the last vCPU reach KVM_RUN */
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    for (;;) {
        errno = 4242; /* must still be here after the read, whatever happened meanwhile */
        ssize_t got = read(0, buf, sizeof(buf));
        int seen = errno;

        if (got < 0) {
            printf("read failed: %s\n", strerror(seen));
            fflush(stdout);
            return 3;
        }
        if (got == 0)
            return 0;
        if (got >= 2 && memcmp(buf, "go", 2) == 0) {
            pthread_mutex_lock(&lock);
            paused = 0;
            pthread_cond_broadcast(&go);
            pthread_mutex_unlock(&lock);
        }
        printf("pong errno=%d sleep_eintr=%d sleep_short=%d sleeps=%d\n", seen, sleep_eintr,
               sleep_short, sleeps);
        fflush(stdout);
    }
}
