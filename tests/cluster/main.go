// Command fermata-testcluster is a multi-call binary holding the real Kubernetes control-plane
// components Fermata's tests run against (no kubelet, no container runtime):
//
//	fermata-testcluster apiserver [--etcd-data-dir=DIR] [--etcd-client-port=N] [--etcd-peer-port=N]
//	                              [--ensure-sa-key=FILE] <kube-apiserver flags...>
//	fermata-testcluster controller-manager <kube-controller-manager flags...>
//	fermata-testcluster scheduler <kube-scheduler flags...>
//	fermata-testcluster kubectl <kubectl args...>   (or through a symlink named "kubectl")
//
// It is glue only: every subcommand is the upstream cobra command of k8s.io/kubernetes.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones, as in upstream kube-apiserver / kube-controller-manager

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	cmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	schedapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = `usage: fermata-testcluster {apiserver|controller-manager|scheduler|kubectl} [args...]`

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if name != "kubectl" {
		if len(args) == 0 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	// The upstream commands read os.Args (cobra, kubectl's plugin handler): present each
	// subcommand as if it were its own binary.
	os.Args = append([]string{name}, args...)

	switch name {
	case "apiserver", "kube-apiserver":
		os.Exit(runAPIServer(args))
	case "controller-manager", "kube-controller-manager":
		os.Exit(cli.Run(cmapp.NewControllerManagerCommand()))
	case "scheduler", "kube-scheduler":
		os.Exit(cli.Run(schedapp.NewSchedulerCommand()))
	case "kubectl":
		runKubectl()
	default:
		fmt.Fprintf(os.Stderr, "unknown subcommand %q\n%s\n", name, usage)
		os.Exit(2)
	}
}
