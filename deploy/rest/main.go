// llmserve-rest: the OpenAI-compatible REST sidecar of llmserve.
//
// It transcodes HTTP/JSON to the gateway's gRPC InferenceService with grpc-gateway (v1, Debian's 1.6.4),
// shaped so that the official OpenAI SDKs work unmodified with base_url="http://HOST:PORT/v1":
//
//	handler.go  the front http.Handler: access log, /health, bearer check, concurrency limit, body limit, JSON
//	            normalisation, "stream": true routing
//	limits.go   the http.Server's timeouts and header cap, per-write deadlines, the in-flight request limit
//	forward.go  response forwarders: unary JSON and server-sent events (data: {...}, data: [DONE])
//	errors.go   gRPC status -> HTTP status + OpenAI error body, Retry-After, unknown routes
//	tls.go      HTTPS for clients, TLS (and a client certificate) to the gateway
//
// The generated Go code (protoc-gen-go + protoc-gen-grpc-gateway from protos/) is compiled into this same
// package by build.sh, which is why these files can replace the generated forward_* variables.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/grpc-ecosystem/grpc-gateway/runtime"
	"google.golang.org/grpc"
)

// inferenceService is the gRPC service name the /health check asks the gateway about.
const inferenceService = "llmserve.inference.v1.InferenceService"

var accessLog = log.New(os.Stderr, "", 0)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "HOST:PORT the REST API listens on")
	gateway := flag.String("gateway", "127.0.0.1:50051", "HOST:PORT of the llmserve gateway (gRPC)")
	shutdownGrace := flag.Duration("shutdown-grace", 5*time.Second, "on SIGTERM/SIGINT, how long running requests may finish")
	lim := defaultLimits()
	flag.Int64Var(&lim.maxBody, "max-body-bytes", lim.maxBody, "larger request bodies get 413")
	flag.DurationVar(&lim.readHeaderTimeout, "read-header-timeout", lim.readHeaderTimeout,
		"a request's headers must arrive within this (slower clients are disconnected); 0: no limit")
	flag.DurationVar(&lim.readTimeout, "read-timeout", lim.readTimeout,
		"a whole request, headers and body, must arrive within this; 0: no limit")
	flag.DurationVar(&lim.writeTimeout, "write-timeout", lim.writeTimeout,
		"each write of a response (a JSON body, one stream event) must complete within this; a client that stops "+
			"reading is disconnected, a stream that keeps being read lasts as long as generation; 0: no limit")
	flag.DurationVar(&lim.idleTimeout, "idle-timeout", lim.idleTimeout,
		"an idle keep-alive connection is closed after this; 0: no limit")
	flag.IntVar(&lim.maxHeaderBytes, "max-header-bytes", lim.maxHeaderBytes, "larger request headers get 431")
	flag.IntVar(&lim.maxConcurrent, "max-concurrent-requests", lim.maxConcurrent,
		"requests in flight at once (streams included; /health excluded); beyond it 503 with Retry-After; 0: no limit")
	var tf tlsFlags
	flag.StringVar(&tf.certFile, "tls-cert", "", "serve HTTPS with this certificate (PEM); empty: plain HTTP")
	flag.StringVar(&tf.keyFile, "tls-key", "", "the private key of --tls-cert (PEM)")
	flag.StringVar(&tf.gatewayCA, "gateway-ca", "",
		"dial the gateway with TLS, trusting these CA certificates (PEM); empty: plaintext gRPC")
	flag.StringVar(&tf.gatewayCert, "gateway-cert", "", "client certificate for the gateway (PEM), if it requires one")
	flag.StringVar(&tf.gatewayKey, "gateway-key", "", "the private key of --gateway-cert (PEM)")
	flag.StringVar(&tf.gatewayServerName, "gateway-server-name", "",
		"the name to check in the gateway's certificate; empty: the host of --gateway")
	flag.Parse()
	if err := lim.validate(); err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(2)
	}
	if err := tf.validate(); err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(2)
	}
	serverTLS, err := tf.serverConfig()
	if err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(1)
	}
	transport, err := tf.gatewayTransport()
	if err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(1)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	conn, handler, err := newSidecar(ctx, *gateway, lim, transport)
	if err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()

	server := newServer(handler, lim)
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "llmserve-rest: cannot listen on %s: %v\n", *listen, err)
		os.Exit(1)
	}
	scheme, gatewayScheme := "http", "plaintext"
	if serverTLS != nil {
		scheme, listener = "https", tls.NewListener(listener, serverTLS)
	}
	if tf.gatewayCA != "" {
		gatewayScheme = "TLS"
	}
	accessLog.Printf("%s llmserve-rest listening on %s://%s (gateway %s over %s, %s)", timestamp(), scheme,
		listener.Addr(), *gateway, gatewayScheme, lim)

	done := make(chan struct{})
	go func() {
		defer close(done)
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		sig := <-signals
		accessLog.Printf("%s llmserve-rest: %v, shutting down", timestamp(), sig)
		shutdownCtx, stop := context.WithTimeout(context.Background(), *shutdownGrace)
		defer stop()
		if err := server.Shutdown(shutdownCtx); err != nil {
			server.Close()
		}
	}()
	if err := server.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "llmserve-rest: %v\n", err)
		os.Exit(1)
	}
	<-done
}

// newSidecar connects to the gateway (transport: plaintext or TLS, tlsFlags.gatewayTransport) and returns the
// whole HTTP handler (also used by the Go tests).
func newSidecar(ctx context.Context, gateway string, lim limits, transport grpc.DialOption,
) (*grpc.ClientConn, http.Handler, error) {
	// Non-blocking dial: the sidecar starts (and answers 503) while the gateway is down.
	conn, err := grpc.DialContext(ctx, gateway,
		transport,
		grpc.WithStreamInterceptor(captureStreamTrailers),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(256<<20), // a batch of 2048 embeddings is far above grpc's default 4 MiB
			grpc.MaxCallSendMsgSize(int(lim.maxBody)+(1<<20)),
		))
	if err != nil {
		return nil, nil, fmt.Errorf("cannot set up a connection to %s: %v", gateway, err)
	}
	mux := newGatewayMux()
	if err := RegisterInferenceServiceHandler(ctx, mux, conn); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("registering the InferenceService handlers: %v", err)
	}
	return conn, &frontHandler{mux: mux, conn: conn, maxBody: lim.maxBody, gateway: gateway,
		inFlight: newInFlight(lim.maxConcurrent), writeTimeout: lim.writeTimeout}, nil
}

// newGatewayMux is grpc-gateway's mux configured for the OpenAI wire shape.
func newGatewayMux() *runtime.ServeMux {
	// Errors: every path (gRPC status, unknown route, wrong method) answers with the OpenAI error body.
	runtime.HTTPError = writeGRPCError
	runtime.OtherErrorHandler = writeRoutingError
	return runtime.NewServeMux(
		// snake_case field names and zero values present, as OpenAI's responses have them.
		runtime.WithMarshalerOption(runtime.MIMEWildcard, &runtime.JSONPb{OrigName: true, EmitDefaults: true}),
		// `Authorization` already travels as `authorization` metadata (runtime.AnnotateContext); nothing else
		// from the HTTP request becomes metadata (no Grpc-Metadata-* injection, no duplicated authorization).
		runtime.WithIncomingHeaderMatcher(func(string) (string, bool) { return "", false }),
		runtime.WithOutgoingHeaderMatcher(exposedHeader),
	)
}

func timestamp() string {
	return time.Now().UTC().Format("2006-01-02T15:04:05.000Z")
}
