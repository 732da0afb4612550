package import Foundation
import FoundationXML

/// One page of a ListObjectsV2 answer.
package struct S3ListPage: Sendable, Equatable {
    /// The objects, with their full keys (the repository's prefix included).
    package var objects: [ObjectInfo]
    /// Where the next page starts, when the answer is truncated.
    package var nextContinuationToken: String?
}

/// The `Code` and `Message` of an S3 error document.
package struct S3ErrorDocument: Sendable, Equatable {
    package var code: String
    package var message: String
}

/// Reads the two XML documents the store needs: a ListObjectsV2 result and an error.
package enum S3XML {
    /// Parses a `ListBucketResult`; nil if the document is not one or an entry is malformed.
    package static func listPage(_ bytes: [UInt8]) -> S3ListPage? {
        guard let root = parse(bytes), root.name == "ListBucketResult" else { return nil }
        var objects: [ObjectInfo] = []
        for entry in root.children where entry.name == "Contents" {
            guard let key = entry.text(of: "Key"), let size = entry.text(of: "Size").flatMap({ Int($0) }),
                let modified = entry.text(of: "LastModified").flatMap(isoDate)
            else { return nil }
            objects.append(ObjectInfo(key: key, sizeBytes: size, lastModified: modified))
        }
        let truncated = root.text(of: "IsTruncated") == "true"
        let token = root.text(of: "NextContinuationToken")
        if truncated && (token ?? "").isEmpty { return nil }
        return S3ListPage(objects: objects, nextContinuationToken: truncated ? token : nil)
    }

    /// Parses an `Error` document; nil if the body is not one.
    package static func error(_ bytes: [UInt8]) -> S3ErrorDocument? {
        guard let root = parse(bytes), root.name == "Error" else { return nil }
        return S3ErrorDocument(code: root.text(of: "Code") ?? "", message: root.text(of: "Message") ?? "")
    }

    /// An ISO 8601 time with or without fractional seconds (`2026-12-05T04:58:43.000Z`).
    package static func isoDate(_ text: String) -> Date? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text)
    }

    /// An HTTP date (`Sat, 05 Dec 2026 04:58:43 GMT`), as in `Last-Modified`.
    package static func httpDate(_ text: String) -> Date? {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        return formatter.date(from: text)
    }

    private static func parse(_ bytes: [UInt8]) -> Element? {
        let parser = XMLParser(data: Data(bytes))
        let builder = TreeBuilder()
        parser.delegate = builder
        guard parser.parse() else { return nil }
        return builder.root
    }

    /// An element, its text and its child elements.
    private final class Element {
        let name: String
        var text = ""
        var children: [Element] = []

        init(name: String) { self.name = name }

        func text(of child: String) -> String? { children.first { $0.name == child }?.text }
    }

    private final class TreeBuilder: NSObject, XMLParserDelegate {
        var root: Element?
        private var stack: [Element] = []

        func parser(
            _ parser: XMLParser, didStartElement elementName: String, namespaceURI: String?,
            qualifiedName qName: String?, attributes attributeDict: [String: String] = [:]
        ) {
            let element = Element(name: elementName)
            if let parent = stack.last { parent.children.append(element) } else { root = element }
            stack.append(element)
        }

        func parser(
            _ parser: XMLParser, didEndElement elementName: String, namespaceURI: String?, qualifiedName qName: String?
        ) {
            stack.removeLast()
        }

        func parser(_ parser: XMLParser, foundCharacters string: String) {
            stack.last?.text += string
        }
    }
}
