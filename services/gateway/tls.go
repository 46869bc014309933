package main

// TLS for the gateway's own port (certificate and key read again when they change, mutual TLS
// as an option) and for its connections to the backends, like the Python servers' (DECISIONS
// D45). The gateway checks no tokens: a caller's `authorization` metadata is forwarded with
// each forwarded call, and the backend decides. Multiplexed Classify calls (--classify-stream)
// travel on the gateway's own stream without the caller's token, so with tokens on the
// backends run the gateway with --classify-stream=false.

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

type fileStamp struct {
	modTime time.Time
	size    int64
}

func stampsOf(paths ...string) ([]fileStamp, error) {
	stamps := make([]fileStamp, 0, len(paths))
	for _, path := range paths {
		info, err := os.Stat(path)
		if err != nil {
			return nil, err
		}
		stamps = append(stamps, fileStamp{info.ModTime(), info.Size()})
	}
	return stamps, nil
}

func sameStamps(a, b []fileStamp) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].modTime.Equal(b[i].modTime) || a[i].size != b[i].size {
			return false
		}
	}
	return true
}

// reloadingConfig serves the certificate (and client CA) last read, and reads them again at a
// handshake after their files changed; a pair that does not load keeps the previous one.
type reloadingConfig struct {
	certFile, keyFile, clientCAFile string

	mu      sync.Mutex
	stamps  []fileStamp
	config  *tls.Config
	reloads int
}

func (r *reloadingConfig) paths() []string {
	paths := []string{r.certFile, r.keyFile}
	if r.clientCAFile != "" {
		paths = append(paths, r.clientCAFile)
	}
	return paths
}

func (r *reloadingConfig) load() (*tls.Config, []fileStamp, error) {
	stamps, err := stampsOf(r.paths()...)
	if err != nil {
		return nil, nil, err
	}
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		return nil, nil, err
	}
	config := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
	if r.clientCAFile != "" {
		pool, err := certPool(r.clientCAFile)
		if err != nil {
			return nil, nil, err
		}
		config.ClientCAs = pool
		config.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return config, stamps, nil
}

// current is tls.Config.GetConfigForClient: called at each handshake.
func (r *reloadingConfig) current(*tls.ClientHelloInfo) (*tls.Config, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if stamps, err := stampsOf(r.paths()...); err == nil && !sameStamps(stamps, r.stamps) {
		if config, loaded, err := r.load(); err == nil {
			r.config, r.stamps = config, loaded
			r.reloads++
		}
	}
	return r.config, nil
}

func newReloadingConfig(certFile, keyFile, clientCAFile string) (*reloadingConfig, *tls.Config, error) {
	r := &reloadingConfig{certFile: certFile, keyFile: keyFile, clientCAFile: clientCAFile}
	config, stamps, err := r.load()
	if err != nil {
		return nil, nil, err
	}
	r.config, r.stamps = config, stamps
	return r, &tls.Config{GetConfigForClient: r.current, MinVersion: tls.VersionTLS12}, nil
}

func certPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return pool, nil
}

type tlsOptions struct {
	cert, key, clientCA                                   string
	backendCA, backendCert, backendKey, backendServerName string
}

// loadTLS builds the server's TLS (nil: plaintext) and the backends' transport credentials.
func loadTLS(t tlsOptions) (*tls.Config, credentials.TransportCredentials, error) {
	var server *tls.Config
	switch {
	case (t.cert == "") != (t.key == ""):
		return nil, nil, errors.New("--tls-cert and --tls-key go together")
	case t.clientCA != "" && t.cert == "":
		return nil, nil, errors.New("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
	case (t.backendCert == "") != (t.backendKey == ""):
		return nil, nil, errors.New("--backend-tls-cert and --backend-tls-key go together")
	case t.cert != "":
		var err error
		if _, server, err = newReloadingConfig(t.cert, t.key, t.clientCA); err != nil {
			return nil, nil, fmt.Errorf("TLS: %w", err)
		}
	}
	if t.backendCA == "" && t.backendCert == "" {
		return server, insecure.NewCredentials(), nil
	}
	client := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.backendServerName}
	if t.backendCA != "" {
		pool, err := certPool(t.backendCA)
		if err != nil {
			return nil, nil, fmt.Errorf("backend TLS: %w", err)
		}
		client.RootCAs = pool
	}
	if t.backendCert != "" {
		// Read at each handshake, so a renewed client certificate is used without a restart.
		if _, err := tls.LoadX509KeyPair(t.backendCert, t.backendKey); err != nil {
			return nil, nil, fmt.Errorf("backend TLS: %w", err)
		}
		client.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, err := tls.LoadX509KeyPair(t.backendCert, t.backendKey)
			return &cert, err
		}
	}
	return server, credentials.NewTLS(client), nil
}
