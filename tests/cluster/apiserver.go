package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	apiapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// wrapperFlags are the flags the apiserver subcommand consumes itself; everything else is
// handed to kube-apiserver unchanged.
type wrapperFlags struct {
	etcdDataDir    string
	etcdClientPort string
	etcdPeerPort   string
	ensureSAKey    []string
}

func parseWrapperFlags(args []string) (wrapperFlags, []string, error) {
	f := wrapperFlags{etcdDataDir: "etcd-data", etcdClientPort: "2379", etcdPeerPort: "2380"}
	targets := map[string]func(string){
		"--etcd-data-dir":    func(v string) { f.etcdDataDir = v },
		"--etcd-client-port": func(v string) { f.etcdClientPort = v },
		"--etcd-peer-port":   func(v string) { f.etcdPeerPort = v },
		"--ensure-sa-key":    func(v string) { f.ensureSAKey = append(f.ensureSAKey, v) },
	}
	var rest []string
	for i := 0; i < len(args); i++ {
		name, value, hasValue := strings.Cut(args[i], "=")
		set, ours := targets[name]
		if !ours {
			rest = append(rest, args[i])
			continue
		}
		if !hasValue {
			if i+1 >= len(args) {
				return f, nil, fmt.Errorf("flag %s needs a value", name)
			}
			i++
			value = args[i]
		}
		set(value)
	}
	return f, rest, nil
}

// ensureRSAKey writes a fresh 2048-bit RSA private key (PKCS#1 PEM) to path unless it exists.
// kube-apiserver accepts the same private key file for --service-account-key-file (it derives
// the public key) and --service-account-signing-key-file.
func ensureRSAKey(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	data := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func startEtcd(f wrapperFlags) (*embed.Etcd, string, error) {
	clientURL, err := url.Parse("http://127.0.0.1:" + f.etcdClientPort)
	if err != nil {
		return nil, "", err
	}
	peerURL, err := url.Parse("http://127.0.0.1:" + f.etcdPeerPort)
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Name = "fermata-test"
	cfg.Dir = f.etcdDataDir
	cfg.ListenClientUrls = []url.URL{*clientURL}
	cfg.AdvertiseClientUrls = []url.URL{*clientURL}
	cfg.ListenPeerUrls = []url.URL{*peerURL}
	cfg.AdvertisePeerUrls = []url.URL{*peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{"stderr"}
	// A throw-away test cluster: an fsync per write only slows the tests down. Data still
	// survives a process restart (it is in the page cache), just not a machine crash.
	cfg.UnsafeNoFsync = true

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", fmt.Errorf("start embedded etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, "", fmt.Errorf("embedded etcd failed: %w", err)
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		e.Close()
		return nil, "", errors.New("embedded etcd not ready after 60s")
	}
	return e, clientURL.String(), nil
}

// runAPIServer starts the embedded etcd, then kube-apiserver against it. kube-apiserver owns
// SIGTERM/SIGINT handling (graceful shutdown); once it returns, etcd is closed cleanly.
func runAPIServer(args []string) int {
	f, rest, err := parseWrapperFlags(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	for _, path := range f.ensureSAKey {
		if err := ensureRSAKey(path); err != nil {
			fmt.Fprintf(os.Stderr, "service-account key %s: %v\n", path, err)
			return 1
		}
	}
	etcd, etcdURL, err := startEtcd(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer etcd.Close()

	os.Args = append([]string{"kube-apiserver", "--etcd-servers=" + etcdURL}, rest...)
	command := apiapp.NewAPIServerCommand()
	code := cli.Run(command)
	fmt.Fprintf(os.Stderr, "kube-apiserver exited with code %d; stopping embedded etcd\n", code)
	return code
}
