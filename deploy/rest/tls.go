package main

// TLS on both sides of the sidecar, from flags:
//
//	--tls-cert, --tls-key        serve HTTPS with this certificate and key (PEM); without them, plain HTTP
//	--gateway-ca                 dial the gateway with TLS, verifying its certificate against these CA
//	                             certificates (PEM); without it, plaintext gRPC
//	--gateway-cert, --gateway-key  the client certificate to present, for a gateway that requires one
//	--gateway-server-name        the name to check in the gateway's certificate (default: the host dialled)
//
// HTTPS is HTTP/1.1 only (no h2 over ALPN): the per-write deadlines of limits.go move one connection's deadline,
// which is one request's only on HTTP/1.1. The TLS handshake is bounded by the server's shortest read or write
// timeout (net/http), so a client cannot hold a connection in the handshake either.

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

type tlsFlags struct {
	certFile, keyFile                                     string
	gatewayCA, gatewayCert, gatewayKey, gatewayServerName string
}

func (f tlsFlags) validate() error {
	switch {
	case (f.certFile == "") != (f.keyFile == ""):
		return fmt.Errorf("--tls-cert and --tls-key go together")
	case (f.gatewayCert == "") != (f.gatewayKey == ""):
		return fmt.Errorf("--gateway-cert and --gateway-key go together")
	case f.gatewayCert != "" && f.gatewayCA == "":
		return fmt.Errorf("--gateway-cert needs --gateway-ca (a client certificate travels over TLS only)")
	}
	return nil
}

// serverConfig is the HTTPS listener's configuration, or nil for plain HTTP.
func (f tlsFlags) serverConfig() (*tls.Config, error) {
	if f.certFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(f.certFile, f.keyFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-cert %s / --tls-key %s: %v", f.certFile, f.keyFile, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"}}, nil
}

// gatewayTransport is how the sidecar dials the gateway: TLS when a CA is given, else plaintext.
func (f tlsFlags) gatewayTransport() (grpc.DialOption, error) {
	if f.gatewayCA == "" {
		return grpc.WithInsecure(), nil
	}
	pem, err := os.ReadFile(f.gatewayCA)
	if err != nil {
		return nil, fmt.Errorf("--gateway-ca: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--gateway-ca %s holds no PEM certificate", f.gatewayCA)
	}
	config := &tls.Config{RootCAs: roots, ServerName: f.gatewayServerName, MinVersion: tls.VersionTLS12}
	if f.gatewayCert != "" {
		cert, err := tls.LoadX509KeyPair(f.gatewayCert, f.gatewayKey)
		if err != nil {
			return nil, fmt.Errorf("--gateway-cert %s / --gateway-key %s: %v", f.gatewayCert, f.gatewayKey, err)
		}
		config.Certificates = []tls.Certificate{cert}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}
