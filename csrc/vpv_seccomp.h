/*
 * vpv_seccomp.h: the data-path workers' system call filter (seccomp.c), internal to csrc/.
 * The control plane reaches it through vhost_pv.h (vpv_seccomp_*); the workers through this.
 */
#ifndef VHOST_PV_VPV_SECCOMP_H
#define VHOST_PV_VPV_SECCOMP_H

/* Confine the calling thread, and only it, to the data path's allow-list in the configured
 * mode (vpv_seccomp_set_mode; kill when never configured). Call once, at the start of a
 * worker thread, before it touches guest memory. Returns 1 when the filter is installed,
 * 0 when the mode is off, or a negative errno: the thread is then NOT filtered and must
 * not serve the guest. */
int vpv_seccomp_enter(void);

#endif
