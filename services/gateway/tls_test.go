package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	visionv1 "github.com/snaplearn/snaplearn/protos/go/gen/snaplearn/vision/v1"
)

// testCA is a real certificate authority made in the test.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	template := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a certificate for localhost/127.0.0.1 (server) or a client, and its key.
func (ca *testCA) issue(t *testing.T, certFile, keyFile string, server bool) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	usage := x509.ExtKeyUsageClientAuth
	if server {
		usage = x509.ExtKeyUsageServerAuth
	}
	template := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{usage}, DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	// The key first: a reloading server sees the pair once the certificate changes too.
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	// Distinct modification times even on a coarse clock.
	later := time.Now().Add(time.Duration(len(ca.pem)) * time.Millisecond)
	_ = os.Chtimes(certFile, later, later)
}

func (ca *testCA) write(t *testing.T, path string) string {
	if err := os.WriteFile(path, ca.pem, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func tlsClient(t *testing.T, addr string, ca *testCA, cert *tls.Certificate) visionv1.VisionServiceClient {
	t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	config := &tls.Config{RootCAs: pool, ServerName: "localhost"}
	if cert != nil {
		config.Certificates = []tls.Certificate{*cert}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return visionv1.NewVisionServiceClient(conn)
}

func classifyCode(client visionv1.VisionServiceClient, user string) (codes.Code, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	reply, err := client.Classify(ctx, &visionv1.ClassifyRequest{UserId: user, Image: []byte{0xff, 0xd8, 0xff}})
	if err != nil {
		return status.Code(err), ""
	}
	return codes.OK, reply.GetLabels()[0].GetLabel()
}

// tlsGateway runs a held backend (TLS with backendCA when not nil) and a gateway with args.
func tlsGateway(t *testing.T, backendTLS *tls.Config, args ...string) string {
	t.Helper()
	backend := &heldBackend{entered: make(chan context.Context, 16), release: make(chan struct{}), received: make(chan string, 1024)}
	var options []grpc.ServerOption
	if backendTLS != nil {
		options = append(options, grpc.Creds(credentials.NewTLS(backendTLS)))
	}
	server := grpc.NewServer(options...)
	visionv1.RegisterVisionServiceServer(server, backend)
	args = append([]string{"--backend", serve(t, server), "--classify-stream=false"}, args...)
	o, err := parseArgs(args, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newProxy(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.close)
	return serve(t, newServer(p, o))
}

func TestTheGatewayServesTLSAndReloadsItsCertificate(t *testing.T) {
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	oldCA, newCA := newTestCA(t, "old"), newTestCA(t, "new")
	oldCA.issue(t, cert, key, true)
	addr := tlsGateway(t, nil, "--tls-cert", cert, "--tls-key", key)

	if code, label := classifyCode(tlsClient(t, addr, oldCA, nil), "s1"); code != codes.OK || label != "topic-of-s1" {
		t.Fatalf("over TLS: %v %q", code, label)
	}
	plain, _ := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer plain.Close()
	if code, _ := classifyCode(visionv1.NewVisionServiceClient(plain), "s1"); code != codes.Unavailable {
		t.Fatalf("a plaintext client got %v", code)
	}
	newCA.issue(t, cert, key, true) // renewed by another CA: new connections get it, no restart
	if code, _ := classifyCode(tlsClient(t, addr, newCA, nil), "s2"); code != codes.OK {
		t.Fatalf("after the renewal, a client trusting the new CA got %v", code)
	}
	if code, _ := classifyCode(tlsClient(t, addr, oldCA, nil), "s3"); code != codes.Unavailable {
		t.Fatalf("after the renewal, a client trusting only the old CA got %v", code)
	}
}

func TestMutualTLSOnBothSides(t *testing.T) {
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	ca := newTestCA(t, "ca")
	ca.issue(t, path("gw.crt"), path("gw.key"), true)
	ca.issue(t, path("backend.crt"), path("backend.key"), true)
	ca.issue(t, path("client.crt"), path("client.key"), false)
	// The backend requires the gateway's client certificate.
	backendCert, err := tls.LoadX509KeyPair(path("backend.crt"), path("backend.key"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	backendTLS := &tls.Config{Certificates: []tls.Certificate{backendCert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}
	caFile := ca.write(t, path("ca.pem"))
	addr := tlsGateway(t, backendTLS,
		"--tls-cert", path("gw.crt"), "--tls-key", path("gw.key"), "--tls-client-ca", caFile,
		"--backend-tls-ca", caFile, "--backend-tls-cert", path("client.crt"), "--backend-tls-key", path("client.key"),
		"--backend-tls-server-name", "localhost")

	if code, _ := classifyCode(tlsClient(t, addr, ca, nil), "s1"); code != codes.Unavailable {
		t.Fatalf("a client without a certificate got %v", code)
	}
	clientCert, _ := tls.LoadX509KeyPair(path("client.crt"), path("client.key"))
	if code, label := classifyCode(tlsClient(t, addr, ca, &clientCert), "s1"); code != codes.OK || label != "topic-of-s1" {
		t.Fatalf("mutual TLS end to end: %v %q", code, label)
	}
}

func TestTLSFlagsGoTogether(t *testing.T) {
	for _, args := range [][]string{
		{"--backend", "x:1", "--tls-cert", "a.crt"},
		{"--backend", "x:1", "--tls-client-ca", "ca.pem"},
		{"--backend", "x:1", "--backend-tls-cert", "c.crt"},
	} {
		if _, err := parseArgs(args, io.Discard); err == nil {
			t.Fatalf("%v accepted", args)
		}
	}
}
