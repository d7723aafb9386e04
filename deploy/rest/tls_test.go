package main

// The sidecar over TLS on both sides: HTTPS for clients, TLS with a client certificate to a fake gateway that
// requires one (as the mesh's internal servers do); a sidecar without the certificate, or with a CA that did not
// sign the gateway's, gets no answer from the gateway, and plain HTTP to the HTTPS port gets none from the sidecar.

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
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/health/grpc_health_v1"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a certificate for 127.0.0.1 and its key under dir as <name>.pem and <name>-key.pem.
func (ca *testCA) issue(t *testing.T, dir, name string) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	return certFile, keyFile
}

func (ca *testCA) write(t *testing.T, dir, name string) string {
	path := filepath.Join(dir, name)
	os.WriteFile(path, ca.pem, 0o644)
	return path
}

// startTLSGateway serves the fake gateway with TLS, requiring client certificates of ca.
func startTLSGateway(t *testing.T, ca *testCA, dir string) string {
	t.Helper()
	certFile, keyFile := ca.issue(t, dir, "gateway")
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert},
		ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})))
	RegisterInferenceServiceServer(server, &fakeGateway{arrived: make(chan struct{}, 16), hold: make(chan struct{}),
		floodEnded: make(chan struct{})})
	hs := health.NewServer()
	hs.SetServingStatus(inferenceService, grpc_health_v1.HealthCheckResponse_SERVING)
	grpc_health_v1.RegisterHealthServer(server, hs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go server.Serve(lis)
	t.Cleanup(server.Stop)
	return lis.Addr().String()
}

// startTLSSidecar runs the sidecar as main does (the same flags, an HTTPS listener) and returns its base URL.
func startTLSSidecar(t *testing.T, gateway string, tf tlsFlags) string {
	t.Helper()
	if err := tf.validate(); err != nil {
		t.Fatal(err)
	}
	serverTLS, err := tf.serverConfig()
	if err != nil {
		t.Fatal(err)
	}
	transport, err := tf.gatewayTransport()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	lim := defaultLimits()
	conn, handler, err := newSidecar(ctx, gateway, lim, transport)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := newServer(handler, lim)
	go server.Serve(tls.NewListener(lis, serverTLS))
	t.Cleanup(func() {
		server.Close()
		conn.Close()
		cancel()
	})
	return "https://" + lis.Addr().String()
}

func httpsClient(ca *testCA) *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	return &http.Client{Timeout: 10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

func post(t *testing.T, client *http.Client, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", url+"/v1/completions", strings.NewReader(`{"model": "m", "prompt": "hi"}`))
	req.Header.Set("Authorization", testKey)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestTLSBothSides(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "mesh CA")
	gateway := startTLSGateway(t, ca, dir)
	restCert, restKey := ca.issue(t, dir, "rest")
	caFile := ca.write(t, dir, "ca.pem")
	url := startTLSSidecar(t, gateway, tlsFlags{certFile: restCert, keyFile: restKey, gatewayCA: caFile,
		gatewayCert: restCert, gatewayKey: restKey})

	status, body := post(t, httpsClient(ca), url)
	if status != 200 || !strings.Contains(body, `"text_completion"`) {
		t.Fatalf("completion over HTTPS and TLS to the gateway: %d %s", status, body)
	}
	resp, err := httpsClient(ca).Get(url + "/health")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/health over HTTPS: %v %v", resp, err)
	}
	resp.Body.Close()

	// A client that does not trust the sidecar's CA refuses it; plain HTTP to the HTTPS port gets no API.
	if _, err := httpsClient(newTestCA(t, "another CA")).Get(url + "/health"); err == nil {
		t.Fatal("a client trusting another CA accepted the sidecar's certificate")
	}
	plain, err := http.Get("http://" + strings.TrimPrefix(url, "https://") + "/health")
	if err == nil {
		if plain.StatusCode == 200 {
			t.Fatal("plain HTTP to the HTTPS port was served")
		}
		plain.Body.Close()
	}
}

func TestGatewayRefusesSidecarsWithoutItsCertificates(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t, "mesh CA")
	gateway := startTLSGateway(t, ca, dir)
	restCert, restKey := ca.issue(t, dir, "rest")
	other := newTestCA(t, "another CA")
	otherCert, otherKey := other.issue(t, t.TempDir(), "rest")
	for name, tf := range map[string]tlsFlags{
		"no client certificate":       {gatewayCA: ca.write(t, dir, "ca.pem")},
		"a certificate of another CA": {gatewayCA: ca.write(t, dir, "ca.pem"), gatewayCert: otherCert, gatewayKey: otherKey},
		"trusting another CA":         {gatewayCA: other.write(t, dir, "other.pem"), gatewayCert: restCert, gatewayKey: restKey},
	} {
		tf.certFile, tf.keyFile = restCert, restKey
		status, body := post(t, httpsClient(ca), startTLSSidecar(t, gateway, tf))
		if status != http.StatusServiceUnavailable {
			t.Fatalf("%s: want 503 (the gateway is unreachable), got %d %s", name, status, body)
		}
	}
}

func TestTLSFlagsValidate(t *testing.T) {
	for _, tf := range []tlsFlags{{certFile: "c"}, {keyFile: "k"}, {gatewayCert: "c", gatewayKey: "k"},
		{gatewayCA: "ca", gatewayCert: "c"}} {
		if tf.validate() == nil {
			t.Fatalf("%+v passed validation", tf)
		}
	}
	if _, err := (tlsFlags{gatewayCA: "/nonexistent"}).gatewayTransport(); err == nil {
		t.Fatal("a missing --gateway-ca passed")
	}
}
