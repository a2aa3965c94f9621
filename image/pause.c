/*
 * pause: the process of a pod's sandbox ("pause") container, for Berth's test images (hack/build-image builds it
 * with gcc -static -Os into an image of its own). It holds the pod's namespaces open by doing nothing, reaps any
 * child re-parented to it (it is PID 1 of a pod that shares its PID namespace), and exits 0 when the runtime
 * stops the sandbox with SIGINT or SIGTERM.
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
	(void)sig;
	_exit(0);
}

/* Collect every exited child: one SIGCHLD may stand for several. */
static void reap(int sig) {
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0) {
	}
}

int main(int argc, char **argv) {
	if (argc > 1 && strcmp(argv[1], "-v") == 0) {
		puts("pause (Berth test image)");
		return 0;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = stop;
	if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) {
		perror("pause: sigaction");
		return 1;
	}
	sa.sa_handler = reap;
	sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
	if (sigaction(SIGCHLD, &sa, NULL) < 0) {
		perror("pause: sigaction");
		return 1;
	}
	for (;;)
		pause(); /* returns after each handled signal */
}
