/*
 * tiny_vmm: many small VMMs for density tests and benchmarks.
 *
 *   tiny_vmm VCPUS COUNT [-name NAME########]
 *
 * Forks COUNT children; each creates one KVM VM with VCPUS vCPUs that never run and keeps what
 * a VMM under `statsd-qmp exec` keeps: the VM fd, the vCPU fds and, obtained by itself with
 * KVM_GET_STATS_FD, one VM stats fd and one stats fd per vCPU. A Python VMM costs ~10 MB and
 * ~30 ms to start; a forked child of this program costs a few pages and a fork.
 *
 * With `-name`, each child rewrites the trailing '#' characters of NAME in its own argument
 * area with its index (zero padded), so /proc/PID/cmdline carries a QEMU-style `-name` that
 * differs per VM (e.g. `tvm-########` -> `tvm-00000042`).
 *
 * Standard output, one line each:
 *   pid PID            for every child that is ready (its fds exist)
 *   failed ERRNO TEXT  for every child that could not make its VM (at most a few lines)
 *   ready OK FAILED    once every child has answered
 * Then commands on standard input, each answered by a line `ok` (or `error TEXT`):
 *   kill PID           SIGKILL that child and reap it
 *   quit (or EOF)      SIGKILL every child, reap them, exit
 * Children die with the parent (PR_SET_PDEATHSIG), so nothing outlives a killed test.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef KVM_GET_STATS_FD
#define KVM_GET_STATS_FD _IO(KVMIO, 0xce)
#endif

struct report {
	int index;
	int error; /* 0: ready; else the errno that stopped it */
};

static int make_vm(int kvm, int vcpus)
{
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return errno;
	if (ioctl(vm, KVM_GET_STATS_FD, 0) < 0)
		return errno;
	for (int id = 0; id < vcpus; id++) {
		int vcpu = ioctl(vm, KVM_CREATE_VCPU, id);
		if (vcpu < 0)
			return errno;
		if (ioctl(vcpu, KVM_GET_STATS_FD, 0) < 0)
			return errno;
	}
	return 0;
}

static void name_child(char *name, int index)
{
	size_t len = strlen(name);
	size_t hashes = 0;
	while (hashes < len && name[len - 1 - hashes] == '#')
		hashes++;
	for (size_t i = 0; i < hashes; i++) {
		name[len - 1 - i] = (char)('0' + index % 10);
		index /= 10;
	}
}

static void child(int kvm, int vcpus, int index, char *name, int report_fd, pid_t parent)
{
	struct report report = {index, 0};
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent) /* the parent died before the line above */
		_exit(1);
	if (name != NULL)
		name_child(name, index);
	report.error = make_vm(kvm, vcpus);
	/* One write of 8 bytes into a pipe is atomic (< PIPE_BUF): reports never interleave. */
	if (write(report_fd, &report, sizeof(report)) != sizeof(report))
		_exit(1);
	close(report_fd);
	if (report.error != 0)
		_exit(2);
	for (;;)
		pause();
}

static pid_t *children;
static int count;

static void kill_all(void)
{
	for (int i = 0; i < count; i++)
		if (children[i] > 0)
			kill(children[i], SIGKILL);
	for (int i = 0; i < count; i++)
		if (children[i] > 0)
			waitpid(children[i], NULL, 0);
}

int main(int argc, char **argv)
{
	if (argc != 3 && !(argc == 5 && strcmp(argv[3], "-name") == 0)) {
		fprintf(stderr, "usage: %s VCPUS COUNT [-name NAME###]\n", argv[0]);
		return 2;
	}
	int vcpus = atoi(argv[1]);
	count = atoi(argv[2]);
	char *name = argc == 5 ? argv[4] : NULL;
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		perror("/dev/kvm");
		return 1;
	}
	int reports[2];
	if (pipe(reports) < 0) {
		perror("pipe");
		return 1;
	}
	children = calloc((size_t)count, sizeof(*children));
	if (children == NULL)
		return 1;
	setvbuf(stdout, NULL, _IOLBF, 0);
	pid_t self = getpid();
	for (int i = 0; i < count; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			printf("failed %d fork: %s\n", errno, strerror(errno));
			count = i;
			break;
		}
		if (pid == 0) {
			close(reports[0]);
			child(kvm, vcpus, i, name, reports[1], self);
		}
		children[i] = pid;
	}
	close(reports[1]);
	int ready = 0, failed = 0;
	struct report report;
	for (int answered = 0; answered < count; answered++) {
		ssize_t got = read(reports[0], &report, sizeof(report));
		if (got != sizeof(report))
			break; /* a child died before answering: counted as failed below */
		if (report.error == 0) {
			ready++;
			printf("pid %d\n", children[report.index]);
		} else {
			if (failed < 5)
				printf("failed %d %s\n", report.error, strerror(report.error));
			failed++;
			waitpid(children[report.index], NULL, 0);
			children[report.index] = 0;
		}
	}
	printf("ready %d %d\n", ready, count - ready);
	char line[64];
	while (fgets(line, sizeof(line), stdin) != NULL) {
		int pid;
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (sscanf(line, "kill %d", &pid) == 1) {
			int found = 0;
			for (int i = 0; i < count; i++) {
				if (children[i] == pid) {
					kill(pid, SIGKILL);
					waitpid(pid, NULL, 0);
					children[i] = 0;
					found = 1;
					break;
				}
			}
			printf(found ? "ok\n" : "error no such child\n");
		} else {
			printf("error unknown command\n");
		}
	}
	kill_all();
	return 0;
}
